"""What security costs: text-classification through client -> preproc -> model_service with
plaintext, with the bearer token, and with mutual TLS + token on both hops, vs in process, same run.

    python bench/bench_ops.py [SENTENCES] [--concurrency 1,16] [--limit 96] [--rounds 3]

SENTENCES defaults to ../shared/bench/sentences.txt (relative to the repo root). The model is the
real all-MiniLM-L6-v2 body with a seeded 3-label head (MLflow components layout); certificates
are made on the spot. Each configuration starts its own pair of services (metrics on, as in
production) and answers one sentence per request from N concurrent asyncio callers; all three
pairs run at once and the rounds interleave them, so background load hits every row alike.

The in-process reference, measured in this process in the same run, is
`pipeline("text-classification")(sentences, batch_size=32)` (sentences/s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from client.preproc_client import AsyncPreprocClient  # noqa: E402
from splitserve_common.channels import ChannelSecurity, aio_channel  # noqa: E402
from splitserve_common.health_probe import check  # noqa: E402
from tests import model_factory, servers  # noqa: E402
from tests.ops_helpers import make_pki  # noqa: E402

DEFAULT_SENTENCES = ROOT.parent / "shared" / "bench" / "sentences.txt"
LABELS = ["negative", "neutral", "positive"]
TOKEN = "bench-token"


def build_model(root: Path):
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    source = model_factory.minilm_dir()
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        str(source), num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)}).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    return model_factory.save_components(root / "model", model, tokenizer, "text-classification"), model, tokenizer


def pipeline_rate(model, tokenizer, sentences: list[str]) -> float:
    from transformers import pipeline

    pipe = pipeline("text-classification", model=model, tokenizer=tokenizer, device="cpu")
    pipe(sentences[:8], truncation=True)  # warm up
    start = time.perf_counter()
    pipe(sentences, batch_size=32, truncation=True)
    return len(sentences) / (time.perf_counter() - start)


def configurations(pki) -> dict[str, tuple[list[str], list[str], ChannelSecurity]]:
    """name -> (server flags for both services, preproc's flags for its hop, client security)."""
    tls_server = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                  "--tls-client-ca", str(pki.ca)]
    tls_hop = ["--model-service-tls-ca", str(pki.ca), "--model-service-tls-cert", str(pki.client.cert),
               "--model-service-tls-key", str(pki.client.key)]
    client_tls = {"ca": str(pki.ca), "cert": str(pki.client.cert), "key": str(pki.client.key)}
    token = ["--auth-token", TOKEN]
    return {
        "plaintext": ([], [], ChannelSecurity()),
        "bearer token": (token, ["--model-service-token", TOKEN], ChannelSecurity(token=TOKEN)),
        "mTLS + token, both hops": ([*tls_server, *token], [*tls_hop, "--model-service-token", TOKEN],
                                    ChannelSecurity(**client_tls, token=TOKEN)),
    }


def wait_serving(handle, security: ChannelSecurity, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle.proc.poll() is not None:
            raise RuntimeError(handle.log())
        if check(handle.address, security, timeout=1.0) == "SERVING":
            return
        time.sleep(0.2)
    raise TimeoutError(handle.log())


async def measure(address: str, security: ChannelSecurity, sentences: list[str], concurrency: int) -> dict:
    latencies: list[float] = []
    next_index = 0
    async with AsyncPreprocClient(address, timeout=120, channel=aio_channel(address, security)) as client:
        for sentence in sentences[:16]:  # warm the connections and the batcher
            await client.classify([sentence])

        async def caller():
            nonlocal next_index
            while next_index < len(sentences):
                sentence = sentences[next_index]
                next_index += 1
                start = time.perf_counter()
                await client.classify([sentence])
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"rate": len(sentences) / elapsed, "p50_ms": 1000 * statistics.median(latencies)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sentences", nargs="?", type=Path, default=DEFAULT_SENTENCES)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--limit", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    sentences = [s.strip() for s in args.sentences.read_text().splitlines() if s.strip()][:args.limit]
    levels = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        model_dir, model, tokenizer = build_model(Path(tmp))
        pki = make_pki(Path(tmp) / "pki")
        # Every configuration runs at once (idle but for its own turn); rounds interleave them, so a
        # change in the machine's background load hits every row alike. Medians over the rounds.
        addresses = {}
        for name, (server_flags, hop_flags, security) in configurations(pki).items():
            m = stack.enter_context(servers.service(
                "model_service", ["--model-dir", str(model_dir), "--metrics-port", str(servers.free_port()),
                                  *server_flags], wait=False))
            wait_serving(m, security)
            p = stack.enter_context(servers.service(
                "preproc_service", ["--model-dir", str(model_dir), "--model-service", m.address, "--metrics-port",
                                    str(servers.free_port()), *server_flags, *hop_flags], wait=False))
            wait_serving(p, security)
            addresses[name] = (p.address, security)
        references, results = [], {}
        for round_number in range(args.rounds):
            references.append(pipeline_rate(model, tokenizer, sentences))
            for name, (address, security) in addresses.items():
                for level in levels:
                    results.setdefault((name, level), []).append(
                        asyncio.run(measure(address, security, sentences, level)))
            print(f"round {round_number + 1} done", file=sys.stderr)

    reference = statistics.median(references)
    print(f"{len(sentences)} sentences from {args.sentences}, median of {args.rounds} interleaved rounds; "
          f"in-process pipeline batch 32: {reference:.1f} sentences/s")
    print()
    print("| configuration | concurrency | sentences/s | p50 ms | vs in-process pipeline | vs plaintext |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    rates = {key: statistics.median(r["rate"] for r in runs) for key, runs in results.items()}
    for (name, level), runs in results.items():
        p50 = statistics.median(r["p50_ms"] for r in runs)
        print(f"| {name} | {level} | {rates[name, level]:.1f} | {p50:.2f} | {rates[name, level] / reference:.2f} | "
              f"{rates[name, level] / rates['plaintext', level]:.2f} |")


if __name__ == "__main__":
    main()
