"""Continuous batching: one loop advances every active sequence one token per step.

Between steps the loop admits waiting requests (their prefill runs in the same engine call
as the step) and retires finished or cancelled sequences, so a slot frees at the next step.
A step whose rows all use the base model only reads it: it runs through `engine.run_forward`,
so a beam search (beam.py) or the tensor API's forward passes run beside it on the other
forward workers; a step with adapter rows goes through `engine.run` (alone). One step at a
time either way. The loop itself and the per-request event queues live on the asyncio event loop.

Limits: `max_sequences` running at once, `max_tokens` positions reserved by them (prompt +
max_new_tokens each), and `max_waiting` requests queued; beyond the last, RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass

from model_service import matmuls
from model_service.adapters import BASE
from model_service.batcher import plan_groups
from model_service.generation.batch import DecodeBatch, GenerationModel, Sequence
from model_service.generation.sampling import TokenChooser
from model_service.threads import StepThreads
from splitserve_common import metrics
from splitserve_common.errors import ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

# The fixed cost of one prefill pass in prompt-token equivalents, for cutting the admitted prompts
# into length groups (model_service.batcher.plan_groups). GPT-2-small-sized on CPU: ~3 ms per token,
# a few ms per pass; 16 leans towards fewer passes for smaller models, whose tokens cost less.
PREFILL_PASS_TOKENS = 16


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
    """The model side of the scheduler: the running batch. Worker thread only.

    One batch holds every running sequence whatever its adapter: the engine's adapter registry
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

    def step(self, admitted: list[Sequence], dropped: list[Sequence]) -> list[tuple[Sequence, StepEvent]]:
        gone = set(dropped)
        self._keep(lambda s: s not in gone)
        stepped = []
        if self.batch is not None:
            with self._use(self.batch.seqs), metrics.stage_timer("decode"), self.threads.step(len(self.batch)), \
                    matmuls.step_kernels(self.onednn, self.fused_gelu):
                self.batch.decode(self.gm)
            stepped += self.batch.seqs
        if admitted:
            # Prompts of similar lengths prefill together: a pass pads every prompt to its longest.
            ordered = sorted(admitted, key=lambda s: len(s.prompt_ids))
            lengths = [len(s.prompt_ids) for s in ordered]
            for start, end in plan_groups(lengths, len(ordered), sum(lengths) * len(ordered), PREFILL_PASS_TOKENS):
                group = ordered[start:end]
                with self._use(group), metrics.stage_timer("prefill"), self.threads.step(0), \
                        matmuls.step_kernels(self.onednn, self.fused_gelu):
                    fresh = DecodeBatch.prefill(self.gm, group)
                self.prefill_passes += 1
                self.batch = fresh if self.batch is None else self.batch.concat(fresh)
            stepped += admitted
        self._keep(lambda s: not s.finish_reason)
        return [(s, StepEvent(s.generated[-1], s.last_logprob, s.finish_reason)) for s in stepped]

    def reset(self) -> None:
        self.batch = None


class Scheduler:
    def __init__(self, engine, gm: GenerationModel, limits: Limits = Limits(), torch_threads: int = 0,
                 onednn_matmuls: bool = True, fused_gelu: bool = True):
        """`torch_threads`: intra-op threads of the steps; 0 chooses between 1 and the engine worker's
        threads by measuring (threads.py). `onednn_matmuls`: the steps' fp32 matrix products on oneDNN
        where the model is on CPU and torch has it (matmuls.py). `fused_gelu`: transformers' NewGELUActivation
        (GPT-2's) as torch's one fused operator in the steps (matmuls.py)."""
        self.engine = engine
        self.gm = gm
        self.limits = limits
        onednn = onednn_matmuls and gm.device.type == "cpu" and matmuls.available()
        if onednn or fused_gelu:
            matmuls.install(gm.model)
        self._core = _Core(gm, engine, StepThreads(engine.torch_threads * engine.forward_workers, torch_threads,
                                                  interleave=True),
                           onednn, fused_gelu)
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.counters = collections.Counter()  # steps, finished, cancelled, generated_tokens

    # ------------------------------------------------------------------ event-loop API

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="generation-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

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
        metrics.set_generation_sequences(len(self._active), len(self._waiting))
        self.start()
        self._wakeup.set()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop generating for `seq`; its slot frees at the next step. No-op once finished."""
        if seq.finish_reason or seq.cancelled:
            return
        seq.cancelled = True
        if seq in self._waiting:
            self._waiting.remove(seq)
            metrics.set_generation_sequences(len(self._active), len(self._waiting))
        self.counters["cancelled"] += 1
        self._wakeup.set()

    @property
    def active_count(self) -> int:
        return len(self._active)

    def stats(self) -> dict:
        return {
            "active_sequences": len(self._active),
            "waiting_sequences": len(self._waiting),
            "tokens_in_flight": sum(s.reserved_tokens for s in self._active),
            "steps": self.counters["steps"],
            "finished": self.counters["finished"],
            "cancelled": self.counters["cancelled"],
            "generated_tokens": self.counters["generated_tokens"],
        }

    # ------------------------------------------------------------------ the loop

    def _admit(self) -> list[Sequence]:
        """Waiting sequences that fit now, first come first served (no overtaking)."""
        admitted = []
        now = time.monotonic()
        count = len(self._active)
        tokens = sum(s.reserved_tokens for s in self._active)
        while self._waiting:
            seq = self._waiting[0]
            if count + 1 > self.limits.max_sequences or tokens + seq.reserved_tokens > self.limits.max_tokens:
                break
            self._waiting.popleft()
            metrics.observe_stage("queue", now - seq.submitted_at)
            metrics.add_prompt_tokens(_label(seq), len(seq.prompt_ids))
            admitted.append(seq)
            count += 1
            tokens += seq.reserved_tokens
        return admitted

    async def _loop(self) -> None:
        while True:
            await self._wakeup.wait()
            dropped = [s for s in self._active if s.cancelled]
            self._active = [s for s in self._active if not s.cancelled]
            admitted = self._admit()
            if not self._active and not admitted and not dropped:
                self._wakeup.clear()
                continue
            run = self.engine.run_forward if _base_only(self._active + admitted) else self.engine.run
            try:
                results = await run(self._core.step, admitted, dropped)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - fail these requests, keep serving the rest
                log.exception("generation step failed")
                await self.engine.run(self._core.reset)
                for seq in self._active + admitted:
                    seq.finish_reason = "error"
                    seq.events.put_nowait(Unavailable(f"generation failed: {type(exc).__name__}: {exc}"))
                self._active = []
                metrics.set_generation_sequences(0, len(self._waiting))
                continue
            self._active += admitted
            self._record(results, admitted)

    def _record(self, results, admitted) -> None:
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
        finished = [s for s in self._active if s.finish_reason]
        if finished:
            self.counters["finished"] += len(finished)
            self._active = [s for s in self._active if not s.finish_reason]
            for seq in finished:
                if len(seq.generated) > 1:
                    metrics.observe_time_per_output_token(
                        _label(seq), (now - seq.first_token_at) / (len(seq.generated) - 1))
        metrics.set_generation_sequences(len(self._active), len(self._waiting))


def _base_only(seqs) -> bool:
    """Every row uses the base model: a forward pass only reads it (adapters change its layers)."""
    return all(seq.adapter in ("", BASE) for seq in seqs)


def _label(seq: Sequence) -> str:
    """The metrics' adapter label: the adapter generated with, "" for the base model."""
    return "" if seq.adapter == BASE else seq.adapter
