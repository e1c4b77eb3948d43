"""Isolation: what one normal caller sees while another floods the service, and while
model_service is killed and restarted (issue 12, "Show").

    python bench/bench_isolation.py [SENTENCES] [--seconds 20] [--flood-callers 2] [--stages]
                                    [--compare VAR=VALUE,... [--rounds 2]]

The real all-MiniLM-L6-v2 (feature-extraction) behind preproc_service and model_service on
loopback. The normal caller sends Embed of one sentence at a time (a 10 s deadline), one call
after another, through three phases:

1. alone;
2. while `--flood-callers` callers each send, one after another, the largest Embed the limits
   allow (`--flood-texts` texts of `--flood-chars` characters: by default preproc's own
   per-request limits, cut to fit the message size limit); the flood runs in a process of its
   own, so that its client CPU and event loop do not slow the normal caller's measurement;
3. while model_service is killed (SIGKILL) and started again on the same port.

For each phase: the normal caller's calls by status, p50 and p99 of its OK calls, and the flood's
calls by status (the flood's call in flight at the phase's end is cancelled, not counted), the
rows model_service computed for the flood per second, and preproc's CPU time: per normal call
alone, and for the flood (over the flood phase, less the normal calls' share at the alone cost).
Every call ends with a status (deadlines included), so "unanswered" is always 0 unless a call
raised something other than a gRPC error. Recovery is the time from model_service answering health
SERVING again to the normal caller's first OK call after it.
Targets (issue 12): flood p99 at most 3x the alone p99 and none of the normal calls refused;
recovery within 1 s.

`--stages` also exports both services' spans (OpenTelemetry, to a receiver in a process of this
bench) and prints where the normal caller's time went, alone and under the flood: per stage
(preproc's tokenize, hop and postprocess; model_service's queue and forward), p50 and p99 over the
normal calls (the traces with exactly one forward span; the flood's have many). `--compare`
runs the alone and flood phases on services started with the given environment variables and on
default ones, interleaved, in one run (A/B on a shared machine: compare within the run).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import multiprocessing
import os
import queue
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2  # noqa: E402

from client.preproc_client import AsyncPreprocClient  # noqa: E402
from tests import model_factory, ops_helpers, servers  # noqa: E402
from tests.ops_helpers import SHARED_SENTENCES, read_sentences  # noqa: E402

NORMAL_DEADLINE = 10.0
FLOOD_DEADLINE = 120.0
SERVING = health_pb2.HealthCheckResponse.SERVING




def preproc_limit(*names: str, default: int) -> int:
    """The default of the first preproc option named in `names` (its per-request limits), else `default`."""
    from preproc_service.cli import OPTIONS

    defaults = {option.name: option.default for option in OPTIONS}
    return next((int(defaults[n]) for n in names if n in defaults), default)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Calls:
    """Every call's outcome: (start, end, status name)."""

    def __init__(self):
        self.records: list[tuple[float, float, str]] = []
        self.messages: dict[str, str] = {}  # the first message seen per status

    async def run(self, call) -> str:
        start = time.monotonic()
        try:
            await call()
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            self.messages.setdefault(code, exc.details() or "")
        except Exception as exc:  # noqa: BLE001 - a call that ended without a status
            code = f"unanswered ({type(exc).__name__})"
        self.records.append((start, time.monotonic(), code))
        return code

    def codes(self) -> dict:
        return dict(collections.Counter(code for _, _, code in self.records))

    def ok_latencies_ms(self) -> list[float]:
        return [1000 * (end - start) for start, end, code in self.records if code == "OK"]


async def normal_caller(address: str, sentences: list[str], stop: asyncio.Event, calls: Calls) -> None:
    async with AsyncPreprocClient(address, timeout=NORMAL_DEADLINE) as client:
        i = 0
        while not stop.is_set():
            code = await calls.run(lambda s=sentences[i % len(sentences)]: client.embed([s]))
            i += 1
            if code != "OK":
                await asyncio.sleep(0.01)  # as a client's retry would


async def flood_caller(address: str, texts: list[str], stop: asyncio.Event, calls: Calls) -> None:
    """Large calls one after another; the one in flight when the phase ends is cancelled (not counted)."""
    async with AsyncPreprocClient(address, timeout=FLOOD_DEADLINE) as client:
        stopped = asyncio.ensure_future(stop.wait())
        while not stop.is_set():
            call = asyncio.ensure_future(calls.run(lambda: client.embed(texts)))
            await asyncio.wait({call, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not call.done():
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await call
                break
            if call.result() != "OK":
                await asyncio.sleep(0.05)
        stopped.cancel()


def flood_process(address: str, texts: list[str], callers: int, ready, stop, results) -> None:
    """The flood's callers, in a process of their own (so that their client CPU and event loop do not slow
    the normal caller's measurement): start them, set `ready`, flood until `stop` is set, then put the
    flood's (records, messages) on `results`."""
    async def flood() -> Calls:
        calls, halt = Calls(), asyncio.Event()
        tasks = [asyncio.ensure_future(flood_caller(address, texts, halt, calls)) for _ in range(callers)]
        ready.set()
        await asyncio.to_thread(stop.wait)
        halt.set()
        await asyncio.gather(*tasks)
        return calls

    calls = asyncio.run(flood())
    results.put((calls.records, calls.messages))


@contextlib.asynccontextmanager
async def flooding(address: str, texts: list[str], callers: int, calls: Calls):
    """Run the flood (flood_process) while the body runs; its calls' outcomes land in `calls`."""
    context = multiprocessing.get_context("spawn")  # no fork of this process's gRPC state
    ready, stop, results = context.Event(), context.Event(), context.Queue()
    process = context.Process(target=flood_process, args=(address, texts, callers, ready, stop, results), daemon=True)
    process.start()
    try:
        if not await asyncio.to_thread(ready.wait, 120):
            raise TimeoutError("the flood process did not start within 120 s")
        yield
        stop.set()
        calls.records, calls.messages = await asyncio.to_thread(results.get, True, FLOOD_DEADLINE + 30)
    finally:
        stop.set()
        await asyncio.to_thread(process.join, 30)
        if process.is_alive():
            process.kill()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process `pid` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def timed_phase(seconds: float, *tasks_of) -> None:
    stop = asyncio.Event()
    tasks = [asyncio.ensure_future(make(stop)) for make in tasks_of]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)


def run_span_receiver(port: int, spans) -> None:
    """An OTLP/gRPC trace receiver (its own process) that puts (trace id, name, start ns, end ns) on `spans`."""
    from bench.bench_tracing import serve_spans

    def put(exported):
        for span in exported:
            spans.put((span.trace_id.hex(), span.name, span.start_time_unix_nano, span.end_time_unix_nano))

    serve_spans(port, put)


def stage_rows(spans: list[tuple], phases: dict[str, tuple[int, int]]) -> list[str]:
    """Per phase and stage, p50 / p99 ms over the normal calls' traces (exactly one forward span)."""
    traces: dict[str, list[tuple]] = collections.defaultdict(list)
    for trace_id, name, start, end in spans:
        traces[trace_id].append((name, start, end))
    lines = []
    for phase, (begin, finish) in phases.items():
        by_stage: dict[str, list[float]] = collections.defaultdict(list)
        for trace in traces.values():
            first = min(start for _, start, _ in trace)
            if sum(name == "forward" for name, _, _ in trace) != 1 or not begin <= first < finish:
                continue
            for name, start, end in trace:
                by_stage[name].append((end - start) / 1e6)
        for name, values in sorted(by_stage.items()):
            lines.append(f"| {phase} | {name} | {len(values)} | {percentile(values, 0.5):.1f} | "
                         f"{percentile(values, 0.99):.1f} |")
    return lines


async def wait_serving(address: str, timeout: float = 300.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(servers.health_status, address, "", 0.5) == SERVING:
            return time.monotonic()
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{address} not SERVING after {timeout} s")


def rows_computed(metrics_port: int) -> float:
    """Rows model_service has computed so far (the sum of its batch-size histogram)."""
    text = ops_helpers.scrape(metrics_port)
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("splitserve_batch_size_sum"))


def row(label: str, normal: Calls, flood: Calls | None = None, extra: str = "") -> str:
    latencies = normal.ok_latencies_ms()
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    flood_codes = flood.codes() if flood is not None else {}
    return (f"| {label} | {len(normal.records)} | {normal.codes()} | {p50:.1f} | {p99:.1f} | "
            f"{flood_codes or '-'} | {extra or '-'} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sentences", nargs="?", default=str(SHARED_SENTENCES))
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--flood-callers", type=int, default=2)
    parser.add_argument("--flood-texts", type=int, default=preproc_limit("max-texts", default=64),
                        help="texts per flood request (default: preproc's --max-texts)")
    parser.add_argument("--flood-chars", type=int, default=0,
                        help="characters per flood text (default: preproc's --max-text-chars, cut so that the "
                             "request fits in --max-message-mb)")
    parser.add_argument("--torch-threads", type=int, default=0, help="model_service --torch-threads (0: all CPUs)")
    parser.add_argument("--compare", default="",
                        help="A/B: VAR=VALUE[,VAR=VALUE...]: the alone and flood phases on services started with these "
                             "environment variables and on default ones, interleaved (--rounds), no restart phase")
    parser.add_argument("--rounds", type=int, default=2, help="with --compare: rounds of the two configurations")
    parser.add_argument("--stages", action="store_true",
                        help="export spans and print the normal caller's time per stage, alone and under the flood")
    args = parser.parse_args()

    if not args.flood_chars:
        message_bytes = preproc_limit("max-message-mb", default=64) * 1024 * 1024
        fitting = int(0.9 * message_bytes) // args.flood_texts
        args.flood_chars = min(preproc_limit("max-text-chars", default=1000), fitting)
    sentences = read_sentences(Path(args.sentences))
    long_text = " ".join(sentences)
    while len(long_text) < args.flood_chars:
        long_text += " " + long_text
    flood_texts = [long_text[i:i + args.flood_chars] for i in range(args.flood_texts)]
    model_dir = model_factory.minilm_dir()
    quiet = ["--log-level", "WARNING"]
    model_args = [*quiet, "--torch-threads", str(args.torch_threads)]
    print(f"all-MiniLM-L6-v2 feature-extraction; normal caller: Embed of 1 sentence, one call after another; "
          f"flood: {args.flood_callers} callers x Embed of {args.flood_texts} texts x {args.flood_chars} chars; "
          f"{args.seconds:.0f} s per phase; machine shared with other work, figures are noisy")

    spans, phases, collected = None, {}, []
    compare = dict(item.split("=", 1) for item in args.compare.split(",")) if args.compare else None
    with contextlib.ExitStack() as running:
        otel = {}
        if args.stages:
            receiver_port = servers.free_port()
            spans = multiprocessing.Queue()
            receiver = multiprocessing.Process(target=run_span_receiver, args=(receiver_port, spans), daemon=True)
            receiver.start()
            running.callback(receiver.terminate)
            otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver_port}",
                    "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_BSP_SCHEDULE_DELAY": "500"}

        async def alone_and_flood(label: str, address: str, metrics_port: int,
                                  preproc_pid: int) -> tuple[list[str], float]:
            warm = Calls()
            await timed_phase(2.0, lambda stop: normal_caller(address, sentences, stop, warm))
            alone = Calls()
            begin, alone_cpu = time.time_ns(), cpu_seconds(preproc_pid)
            await timed_phase(args.seconds, lambda stop: normal_caller(address, sentences, stop, alone))
            alone_cpu = (cpu_seconds(preproc_pid) - alone_cpu) / max(1, len(alone.records))  # per normal call
            phases[f"{label}alone"] = (begin, time.time_ns())
            normal, flood = Calls(), Calls()
            async with flooding(address, flood_texts, args.flood_callers, flood):
                rows_before, begin = rows_computed(metrics_port), time.time_ns()
                cpu_before = cpu_seconds(preproc_pid)
                await timed_phase(args.seconds, lambda stop: normal_caller(address, sentences, stop, normal))
                phases[f"{label}flood"] = (begin, time.time_ns())
                flood_rows = rows_computed(metrics_port) - rows_before - len(normal.records)
                preproc_cpu = cpu_seconds(preproc_pid) - cpu_before
            if spans is not None:
                await asyncio.sleep(2.0)  # the services' span processors export every 0.5 s
                with contextlib.suppress(queue.Empty):
                    while True:
                        collected.append(spans.get(timeout=1.0))
            for who, calls in (("normal", normal), ("flood", flood)):
                for code, message in calls.messages.items():
                    print(f"{label}{who} caller, first {code}: {message}")
            ratio = percentile(normal.ok_latencies_ms(), 0.99) / percentile(alone.ok_latencies_ms(), 0.99)
            # preproc's CPU for the flood: over the phase, less the normal calls' share at the alone phase's cost
            flood_cpu = max(0.0, preproc_cpu - alone_cpu * len(normal.records))
            per_flood_call = (f"{1000 * flood_cpu / len(flood.records):.0f} ms per flood call ended" if flood.records
                              else "no flood call ended")
            rows = [row(f"{label}alone", alone, extra=f"preproc CPU {1000 * alone_cpu:.1f} ms per call"),
                    row(f"{label}flood", normal, flood, f"{flood_rows / args.seconds:.0f} flood rows/s computed; "
                                                        f"preproc CPU {preproc_cpu:.1f} s, {flood_cpu:.1f} s for the "
                                                        f"flood ({per_flood_call}); "
                                                        f"p99 flood / alone {ratio:.2f}")]
            return rows, ratio

        def start(stack: contextlib.ExitStack, env: dict):
            metrics_port = servers.free_port()
            model = stack.enter_context(servers.model_service(
                model_dir, *model_args, "--metrics-port", str(metrics_port), port=servers.free_port(),
                env={**otel, **env}))
            preproc = stack.enter_context(servers.preproc_service(
                model_dir, model.address, *quiet, "--metrics-port", "0", env={**otel, **env}))
            return model, preproc, metrics_port

        if compare is not None:  # A/B: the two configurations interleaved, each on services of its own
            rows, ratio = [], float("nan")
            for round_number in range(args.rounds):
                for label, env in ((f"{args.compare} r{round_number + 1}: ", compare),
                                   (f"default r{round_number + 1}: ", {})):
                    with contextlib.ExitStack() as stack:
                        model, preproc, metrics_port = start(stack, env)
                        more, ratio = asyncio.run(alone_and_flood(label, preproc.address, metrics_port,
                                                                  preproc.proc.pid))
                        rows += more
        else:
            model, preproc, metrics_port = start(running, {})
            address = preproc.address

            async def scenario():
                nonlocal model
                rows, ratio = await alone_and_flood("", address, metrics_port, preproc.proc.pid)
                restart = Calls()
                stop = asyncio.Event()
                caller = asyncio.ensure_future(normal_caller(address, sentences, stop, restart))
                await asyncio.sleep(2.0)
                killed = time.monotonic()
                model.proc.send_signal(signal.SIGKILL)
                await asyncio.to_thread(model.proc.wait)
                port = int(model.address.rsplit(":", 1)[1])
                model = running.enter_context(servers.model_service(
                    model_dir, *model_args, "--metrics-port", "0", port=port, wait=False, env=otel))
                serving = await wait_serving(model.address)
                await asyncio.sleep(max(2.0, args.seconds - (time.monotonic() - killed)))
                stop.set()
                await caller
                first_ok = min((end for start, end, code in restart.records if code == "OK" and end >= serving),
                               default=float("nan"))
                rows.append(row("model_service killed and restarted", restart,
                                extra=f"down {serving - killed:.1f} s (restart + load); "
                                      f"recovery {first_ok - serving:.2f} s after SERVING"))
                return rows, ratio

            rows, ratio = asyncio.run(scenario())
    print()
    print("| phase | normal calls | by status | p50 ms | p99 ms | flood calls by status | notes |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for line in rows:
        print(line)
    print(f"\nflood p99 / alone p99 = {ratio:.2f} (target <= 3)")
    if spans is not None:
        print("\nThe normal caller's time per stage (spans):\n")
        print("| phase | stage | spans | p50 ms | p99 ms |")
        print("| --- | --- | ---: | ---: | ---: |")
        for line in stage_rows(collected, phases):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
