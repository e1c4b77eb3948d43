"""Continuous batching: each lane's loop advances its active sequences one token per step.

The running sequences are split into lanes (`lanes`: one by default, or one per forward worker), each
its own DecodeBatch whose steps run on a forward worker beside the other lanes' steps. Several lanes
gave more tokens/s at 32 streams on an idle node and fewer on a shared one (docs/generation.md). A lane alone
(the others idle) steps with the chosen torch threads (threads.py, as one batch did); with several
lanes busy each step uses its worker's own share (one thread on 2 cores): steps on one thread end
no operator in an OpenMP barrier, which a thread that lost its core on a shared node holds up.

Between its steps a lane admits waiting requests (their prefill runs in the same engine call
as the step) and retires finished or cancelled sequences, so a slot frees at the next step.
The lanes share one FIFO queue and the limits: a lane at its step boundary takes the head of
the queue up to its share of the rows (running + admissible, split over the lanes once there
are LANE_MIN_ROWS of them), so the rows spread evenly and none overtakes another.
A step whose rows all use the base model only reads it: it runs through `engine.run_forward`,
so the other lanes, a beam search (beam.py) or the tensor API's forward passes run beside it on
the other forward workers; a step with adapter rows goes through `engine.run` (alone): the lanes
then take turns. A failed step fails its lane's rows only. The loops and the per-request event
queues live on the asyncio event loop.

Limits: `max_sequences` running at once, `max_tokens` positions reserved by them (prompt +
max_new_tokens each), and `max_waiting` requests queued; beyond the last, RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from dataclasses import dataclass

from model_service import matmuls
from model_service.adapters import BASE
from model_service.batcher import plan_groups
from model_service.generation.batch import DecodeBatch, GenerationModel, Sequence
from model_service.generation.sampling import TokenChooser
from model_service.threads import StepThreads
from splitserve_common import metrics
from splitserve_common.errors import ConfigurationError, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

# The fixed cost of one prefill pass in prompt-token equivalents, for cutting the admitted prompts
# into length groups (model_service.batcher.plan_groups). GPT-2-small-sized on CPU: ~3 ms per token,
# a few ms per pass; 16 leans towards fewer passes for smaller models, whose tokens cost less.
PREFILL_PASS_TOKENS = 16

# Fewer rows than this (running + admissible) stay in one lane, which may use every thread of the
# forward workers (StepThreads) rather than split into lanes of one thread each.
LANE_MIN_ROWS = 8


@dataclass(frozen=True)
class Limits:
    max_sequences: int = 64
    max_tokens: int = 65536
    max_waiting: int = 1024


@dataclass
class StepEvent:
    """What one sequence got from one step."""

    token: int
    logprob: float | None
    finish_reason: str  # "" unless this is the sequence's last token


class _Core:
    """The model side of one lane: its running batch. Worker thread only, one step at a time.

    One batch holds every sequence of the lane whatever its adapter: the engine's adapter registry
    applies each row's own adapter (model_service.adapters).
    """

    def __init__(self, gm: GenerationModel, engine, threads: StepThreads, onednn: bool = False,
                 fused_gelu: bool = False):
        self.gm = gm
        self.engine = engine
        self.threads = threads
        self.onednn = onednn  # matrix products on oneDNN (matmuls.py)
        self.fused_gelu = fused_gelu  # GPT-2's GELU as one operator (matmuls.py)
        self.batch: DecodeBatch | None = None
        self.prefill_passes = 0

    def _use(self, seqs):
        return self.engine.adapters.use([s.adapter for s in seqs])

    def _keep(self, keep) -> None:
        if self.batch is not None:
            self.batch = self.batch.filter([i for i, s in enumerate(self.batch.seqs) if keep(s)])

    def _threads(self, rows: int, alone: bool):
        """Alone, the chosen count (timed for `rows` rows); beside other lanes, the worker's own threads."""
        return self.threads.step(rows) if alone else contextlib.nullcontext()

    def step(self, admitted: list[Sequence], dropped: list[Sequence],
             alone: bool = True) -> list[tuple[Sequence, StepEvent]]:
        gone = set(dropped)
        self._keep(lambda s: s not in gone)
        stepped = []
        if self.batch is not None:
            with self._use(self.batch.seqs), metrics.stage_timer("decode"), self._threads(len(self.batch), alone), \
                    matmuls.step_kernels(self.onednn, self.fused_gelu):
                self.batch.decode(self.gm)
            stepped += self.batch.seqs
        if admitted:
            # Prompts of similar lengths prefill together: a pass pads every prompt to its longest.
            ordered = sorted(admitted, key=lambda s: len(s.prompt_ids))
            lengths = [len(s.prompt_ids) for s in ordered]
            for start, end in plan_groups(lengths, len(ordered), sum(lengths) * len(ordered), PREFILL_PASS_TOKENS):
                group = ordered[start:end]
                with self._use(group), metrics.stage_timer("prefill"), self._threads(0, alone), \
                        matmuls.step_kernels(self.onednn, self.fused_gelu):
                    fresh = DecodeBatch.prefill(self.gm, group)
                self.prefill_passes += 1
                self.batch = fresh if self.batch is None else self.batch.concat(fresh)
            stepped += admitted
        self._keep(lambda s: not s.finish_reason)
        return [(s, StepEvent(s.generated[-1], s.last_logprob, s.finish_reason)) for s in stepped]

    def reset(self) -> None:
        self.batch = None


class _Lane:
    """One lane on the event loop: its core, its running sequences (admitted ones included from the
    moment they are taken off the queue) and the event that wakes its loop."""

    def __init__(self, core: _Core):
        self.core = core
        self.active: list[Sequence] = []
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task | None = None


class Scheduler:
    def __init__(self, engine, gm: GenerationModel, limits: Limits = Limits(), torch_threads: int = 0,
                 onednn_matmuls: bool = True, fused_gelu: bool = True, lanes: int = 1):
        """`torch_threads`: intra-op threads of a lane stepping alone; 0 chooses between 1 and the engine
        workers' threads by measuring (threads.py). `onednn_matmuls`: the steps' fp32 matrix products on
        oneDNN where the model is on CPU and torch has it (matmuls.py). `fused_gelu`: transformers'
        NewGELUActivation (GPT-2's) as torch's one fused operator in the steps (matmuls.py). `lanes`: decode
        batches stepping at once, at most the engine's forward workers (0: one per forward worker; 1: one batch)."""
        if lanes < 0:
            raise ConfigurationError(f"--gen-lanes must be >= 0 (0: one per forward worker), not {lanes}")
        self.engine = engine
        self.gm = gm
        self.limits = limits
        onednn = onednn_matmuls and gm.device.type == "cpu" and matmuls.available()
        if onednn or fused_gelu:
            matmuls.install(gm.model)
        # One chooser for every lane: only a lane stepping alone uses (and times) it.
        threads = StepThreads(engine.torch_threads * engine.forward_workers, torch_threads, interleave=True)
        count = min(lanes or engine.forward_workers, engine.forward_workers)
        self._lanes = [_Lane(_Core(gm, engine, threads, onednn, fused_gelu)) for _ in range(count)]
        self._waiting: collections.deque[Sequence] = collections.deque()
        self.counters = collections.Counter()  # steps, finished, cancelled, generated_tokens

    # ------------------------------------------------------------------ event-loop API

    def start(self) -> None:
        for index, lane in enumerate(self._lanes):
            if lane.task is None:
                lane.task = asyncio.get_running_loop().create_task(self._loop(lane), name=f"generation-lane-{index}")

    async def stop(self) -> None:
        for lane in self._lanes:
            if lane.task is not None:
                lane.task.cancel()
                try:
                    await lane.task
                except asyncio.CancelledError:
                    pass
                lane.task = None

    def _wake(self) -> None:
        for lane in self._lanes:
            lane.wakeup.set()

    @property
    def _active(self) -> list[Sequence]:
        return [seq for lane in self._lanes for seq in lane.active]

    def submit(self, seq: Sequence) -> Sequence:
        """Queue a validated sequence; its StepEvents (or an exception) arrive on `seq.events`."""
        if seq.reserved_tokens > self.limits.max_tokens:
            raise ResourceExhausted(
                f"request needs {seq.reserved_tokens} tokens (prompt + max_new_tokens), more than the "
                f"generation limit of {self.limits.max_tokens} tokens in flight (--gen-max-tokens)")
        if len(self._waiting) >= self.limits.max_waiting:
            raise ResourceExhausted(f"generation queue is full ({self.limits.max_waiting} requests waiting)")
        seq.chooser = TokenChooser(seq.params, self.gm.device)
        seq.events = asyncio.Queue()
        seq.submitted_at = time.monotonic()
        self._waiting.append(seq)
        metrics.set_generation_sequences(self.active_count, len(self._waiting))
        self.start()
        self._wake()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop generating for `seq`; its slot frees at the next step. No-op once finished."""
        if seq.finish_reason or seq.cancelled:
            return
        seq.cancelled = True
        if seq in self._waiting:
            self._waiting.remove(seq)
            metrics.set_generation_sequences(self.active_count, len(self._waiting))
        self.counters["cancelled"] += 1
        self._wake()

    @property
    def active_count(self) -> int:
        return sum(len(lane.active) for lane in self._lanes)

    def stats(self) -> dict:
        return {
            "active_sequences": self.active_count,
            "waiting_sequences": len(self._waiting),
            "tokens_in_flight": sum(s.reserved_tokens for s in self._active),
            "steps": self.counters["steps"],
            "finished": self.counters["finished"],
            "cancelled": self.counters["cancelled"],
            "generated_tokens": self.counters["generated_tokens"],
        }

    # ------------------------------------------------------------------ the loop

    def _admit(self, lane: _Lane) -> list[Sequence]:
        """Waiting sequences that fit now, first come first served (no overtaking), up to this lane's
        share: the running and admissible rows split evenly over the lanes (one lane below LANE_MIN_ROWS)."""
        count = self.active_count
        tokens = sum(s.reserved_tokens for s in self._active)
        fitting = 0
        for seq in self._waiting:
            if count + fitting + 1 > self.limits.max_sequences or tokens + seq.reserved_tokens > self.limits.max_tokens:
                break
            fitting += 1
            tokens += seq.reserved_tokens
        rows = count + fitting
        share = rows if rows < LANE_MIN_ROWS else math.ceil(rows / len(self._lanes))
        now = time.monotonic()
        admitted = []
        for _ in range(min(fitting, share - len(lane.active))):
            seq = self._waiting.popleft()
            metrics.observe_stage("queue", now - seq.submitted_at)
            metrics.add_prompt_tokens(_label(seq), len(seq.prompt_ids))
            admitted.append(seq)
        return admitted

    async def _loop(self, lane: _Lane) -> None:
        while True:
            await lane.wakeup.wait()
            dropped = [s for s in lane.active if s.cancelled]
            lane.active = [s for s in lane.active if not s.cancelled]
            admitted = self._admit(lane)
            if not lane.active and not admitted and not dropped:
                lane.wakeup.clear()
                continue
            lane.active += admitted
            alone = not any(other.active for other in self._lanes if other is not lane)
            run = self.engine.run_forward if _base_only(lane.active) else self.engine.run
            try:
                results = await run(lane.core.step, admitted, dropped, alone)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - fail this lane's requests, keep serving the rest
                log.exception("generation step failed")
                lane.core.reset()  # no step of this lane is running: its batch is ours
                failed, lane.active = lane.active, []
                for seq in failed:
                    seq.finish_reason = "error"
                    seq.events.put_nowait(Unavailable(f"generation failed: {type(exc).__name__}: {exc}"))
                metrics.set_generation_sequences(self.active_count, len(self._waiting))
                self._wake()  # their slots are free for the queue
                continue
            self._record(lane, results, admitted)

    def _record(self, lane: _Lane, results, admitted) -> None:
        now = time.monotonic()
        for seq in admitted:
            seq.first_token_at = now
            metrics.observe_time_to_first_token(_label(seq), now - seq.submitted_at)
        self.counters["steps"] += 1
        self.counters["generated_tokens"] += len(results)
        for adapter, count in collections.Counter(_label(seq) for seq, _ in results).items():
            metrics.add_generated_tokens(adapter, count)
        for seq, event in results:
            if not seq.cancelled:
                seq.events.put_nowait(event)
        finished = [s for s in lane.active if s.finish_reason]
        if finished:
            self.counters["finished"] += len(finished)
            lane.active = [s for s in lane.active if not s.finish_reason]
            for seq in finished:
                if len(seq.generated) > 1:
                    metrics.observe_time_per_output_token(
                        _label(seq), (now - seq.first_token_at) / (len(seq.generated) - 1))
            if self._waiting:
                self._wake()  # freed slots: an idle lane may take the queue's head now
        metrics.set_generation_sequences(self.active_count, len(self._waiting))


def _base_only(seqs) -> bool:
    """Every row uses the base model: a forward pass only reads it (adapters change its layers)."""
    return all(seq.adapter in ("", BASE) for seq in seqs)


def _label(seq: Sequence) -> str:
    """The metrics' adapter label: the adapter generated with, "" for the base model."""
    return "" if seq.adapter == BASE else seq.adapter
