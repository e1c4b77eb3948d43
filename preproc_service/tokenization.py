"""Tokenization of concurrent requests, micro-batched through the fast tokenizer's batch API.

Requests await `Tokenization.encode(...)`; everything queued while the tokenizer
thread is busy goes into the next round of `encode_batch` calls (Rust, releases the GIL).
A round holds at most `max_batch` texts and `round_chars` characters, taken from the requests
with the least left to do first: a large request is tokenized a round at a time, so small
requests that arrive meanwhile pass it instead of waiting for all of it. Each round counts as
work for the deployment's MemoryReleaser (splitserve_common/memory.py), so the memory a lot of
text took goes back to the system soon after (glibc's malloc_trim).
Each truncation setting has its own copy of the Rust tokenizer, so no call ever
mutates a tokenizer another thread is using. A small request that comes alone (concurrency 1) is
tokenized on the event loop instead, saving the two thread hand-offs (`Tokenization.encode`).

Bulk lane (`bulk_nice` > 0): requests of more than one round's characters are tokenized on a
thread of their own whose nice value is raised by `bulk_nice` (splitserve_common/priority.py), and
small requests on the normal thread. A small request then waits for no round of a large one at all,
and while both compute, the kernel gives the small one's thread most of a shared core. With
the tokenizers library's own parallelism on, `encode_batch` runs on the library's thread pool
(not niced, shared by both lanes): preproc-service turns it off unless TOKENIZERS_PARALLELISM is set.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Encoding, Tokenizer

from splitserve_common.errors import InvalidArgument
from splitserve_common.memory import MemoryReleaser
from splitserve_common.priority import check_nice, raise_thread_nice

_MAX_BACKENDS = 16
# A lone request (see Tokenization.encode) of at most this many characters is tokenized on the event loop:
# one sentence takes ~0.1 ms there, against ~0.25 ms more for the hand-off to the tokenizer thread and back.
INLINE_CHARS = 1024
# Requests this far apart (seconds) come alone: at concurrency 1 each call is a whole round trip apart.
LONE_GAP = 0.005


@dataclass(frozen=True)
class EncodeOptions:
    """What changes how texts are cut; requests with equal options share one batch call."""
    add_special_tokens: bool = True
    max_length: int | None = None   # None: no truncation
    stride: int = 0                 # overlap of overflow windows (question-answering)
    strategy: str = "longest_first"  # longest_first | only_first | only_second


def _text_chars(item) -> int:
    return len(item) if isinstance(item, str) else sum(len(part) for part in item)


@dataclass
class _Job:
    texts: list
    options: EncodeOptions
    future: asyncio.Future
    encodings: list = field(default_factory=list)  # of texts[:len(encodings)], so far
    chars_left: int = 0

    def __post_init__(self):
        self.chars_left = sum(_text_chars(t) for t in self.texts)


class _Lane:
    """One tokenizer thread and the jobs queued for it, tokenized in rounds (see the module docstring);
    without a `name`, the event loop's own tokenizers for lone small requests (`Tokenization.encode`)."""

    def __init__(self, name: str = "", nice: int = 0):
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=name, initializer=raise_thread_nice,
                                           initargs=(nice,)) if name else None
        self.pending: list[_Job] = []
        self.draining = False
        self.drain_task: asyncio.Future | None = None
        self.backends: dict[EncodeOptions, Tokenizer] = {}  # per lane: no tokenizer is shared between threads


class Tokenization:
    def __init__(self, tokenizer, max_length: int, max_batch: int = 512, round_chars: int = 16384,
                 memory: MemoryReleaser | None = None, bulk_nice: int = 0, inline_chars: int = INLINE_CHARS,
                 lone_gap: float = LONE_GAP, crowded: Callable[[], bool] = lambda: False):
        """`tokenizer`: a transformers fast tokenizer (decode, special tokens); `max_length`: model limit;
        `memory`: told after each round (None: nothing is released); `bulk_nice`: requests of more than
        `round_chars` characters go to a thread of their own with this much more nice value (0: one
        thread for all); `inline_chars`, `lone_gap`, `crowded` (true while other requests are in progress: the
        deployment's model calls in flight): which requests are tokenized on the event loop (`encode`)."""
        if not getattr(tokenizer, "is_fast", False):
            raise InvalidArgument("preproc_service needs a fast (tokenizers-backed) tokenizer")
        check_nice("tokenize-bulk-nice", bulk_nice)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_batch = max_batch
        self.round_chars = round_chars
        self.inline_chars = inline_chars
        self.lone_gap = lone_gap
        self._crowded = crowded
        self._memory = memory
        self._backend_json = tokenizer.backend_tokenizer.to_str()
        self._lane = _Lane("tokenizer")
        self._bulk_lane = _Lane("tokenizer-bulk", bulk_nice) if bulk_nice > 0 else self._lane
        self._inline = _Lane()
        self._arrived = float("-inf")   # event loop time of the last encode call
        self._gaps = (0.0, 0.0)         # between the last three encode calls

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else int(pad)

    async def encode(self, texts: list, options: EncodeOptions, overflow: bool = False) -> list[list[Encoding]]:
        """One list of encodings per text (a str or a (text, text_pair) tuple).

        Without `overflow` each list holds one encoding; with it, the overflow windows follow.
        A small request that comes alone (at most `inline_chars` characters, the tokenizer thread idle, no
        other request `crowded` in, and this call and the one before each at least `lone_gap` after the
        previous call: concurrency 1) is tokenized right here on the event loop, without the two thread
        hand-offs. Requests of concurrent callers still share the thread's rounds: tokenized one by one as
        they arrive, the first of a burst (whose others had all been answered) reached model_service alone
        and took a forward pass of its own (5-10 % less throughput at concurrency 8), and at concurrency 32
        arrivals spread over the passes' ends came 5 ms apart often enough to split batches (bench/NOTES.md).
        """
        if not texts:
            return []
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._gaps, self._arrived = (self._gaps[1], now - self._arrived), now
        job = _Job(list(texts), options, loop.create_future())
        if self._lone(job):
            encodings = self._encode_parts(self._inline, [(job, job.texts)])[0]
            if self._memory is not None:
                self._memory.worked()
            if isinstance(encodings, BaseException):
                raise encodings
        else:
            encodings = await self._queue(job)
        if overflow:
            return [[enc, *enc.overflowing] for enc in encodings]
        return [[enc] for enc in encodings]

    def _lone(self, job: _Job) -> bool:
        return (job.chars_left <= self.inline_chars and not self._lane.draining and min(self._gaps) >= self.lone_gap
                and not self._crowded())

    async def _queue(self, job: _Job) -> list[Encoding]:
        lane = self._bulk_lane if job.chars_left > self.round_chars else self._lane
        lane.pending.append(job)
        if not lane.draining:
            lane.draining = True
            lane.drain_task = asyncio.ensure_future(self._drain(lane))  # keep a reference: tasks are weakly held
        return await job.future

    async def encode_truncating(self, texts: list, truncation: bool, strategy: str = "longest_first",
                                limit: int | None = None) -> list[Encoding]:
        """One encoding per text, cut to the model limit (pipelines' default) or refused when too long."""
        limit = limit or self.max_length
        options = EncodeOptions(max_length=limit if truncation else None, strategy=strategy)
        encodings = [group[0] for group in await self.encode(texts, options)]
        if not truncation:
            for i, enc in enumerate(encodings):
                if len(enc.ids) > limit:
                    raise InvalidArgument(
                        f"input {i} is {len(enc.ids)} tokens long, more than the model's limit of {limit} tokens "
                        f"(send truncation=true to cut it)")
        return encodings

    async def _drain(self, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        try:
            while lane.pending:
                parts = self._next_round(lane)
                results = await loop.run_in_executor(lane.executor, self._encode_parts, lane, parts)
                for (job, texts), result in zip(parts, results, strict=True):
                    self._settle(lane, job, texts, result)
                if self._memory is not None:
                    self._memory.worked()
        finally:
            lane.draining = False

    def _next_round(self, lane: _Lane) -> list[tuple[_Job, list]]:
        """(job, its next texts) for one round: the jobs with the least left first, within the round's
        budget of texts and characters; the first job always gets at least one text."""
        lane.pending = [job for job in lane.pending if not job.future.done()]  # callers that went away
        parts, texts_left, chars_left = [], self.max_batch, self.round_chars
        for job in sorted(lane.pending, key=lambda j: j.chars_left):
            start = len(job.encodings)
            end = start
            while end < len(job.texts) and texts_left > 0:
                size = _text_chars(job.texts[end])
                if size > chars_left and (parts or end > start):  # over budget, unless it is the round's first
                    break
                texts_left, chars_left, end = texts_left - 1, chars_left - size, end + 1
            if end > start:
                parts.append((job, job.texts[start:end]))
            if texts_left <= 0 or chars_left <= 0:
                break
        return parts

    def _settle(self, lane: _Lane, job: _Job, texts: list, result) -> None:
        if job.future.done():
            return  # the caller went away
        if isinstance(result, BaseException):
            job.future.set_exception(result)
        else:
            job.encodings.extend(result)
            job.chars_left -= sum(_text_chars(t) for t in texts)
            if len(job.encodings) == len(job.texts):
                job.future.set_result(job.encodings)
        if job.future.done():
            lane.pending.remove(job)

    def _encode_parts(self, lane: _Lane, parts: list[tuple[_Job, list]]) -> list:
        """Runs on the lane's thread: one encode_batch per option set (chunks of max_batch texts)."""
        results: list = [None] * len(parts)
        by_options: dict[EncodeOptions, list[int]] = {}
        for i, (job, _) in enumerate(parts):
            by_options.setdefault(job.options, []).append(i)
        for options, indices in by_options.items():
            texts = [text for i in indices for text in parts[i][1]]
            try:
                backend = self._backend(lane, options)
                encodings = []
                for start in range(0, len(texts), self.max_batch):
                    chunk = texts[start:start + self.max_batch]
                    encodings.extend(backend.encode_batch(chunk, add_special_tokens=options.add_special_tokens))
            except Exception as exc:  # noqa: BLE001 - e.g. a question longer than the window
                for i in indices:
                    results[i] = InvalidArgument(f"tokenization failed: {exc}")
                continue
            offset = 0
            for i in indices:
                n = len(parts[i][1])
                results[i] = encodings[offset:offset + n]
                offset += n
        return results

    def _backend(self, lane: _Lane, options: EncodeOptions) -> Tokenizer:
        backend = lane.backends.get(options)
        if backend is None:
            if len(lane.backends) >= _MAX_BACKENDS:  # callers choose max_length: keep the cache bounded
                lane.backends.clear()
            backend = Tokenizer.from_str(self._backend_json)
            backend.no_padding()
            if options.max_length is None:
                backend.no_truncation()
            else:
                backend.enable_truncation(options.max_length, stride=options.stride, strategy=options.strategy)
            lane.backends[options] = backend
        return backend

    def close(self) -> None:
        for lane in {id(lane): lane for lane in (self._lane, self._bulk_lane)}.values():
            lane.executor.shutdown(wait=False, cancel_futures=True)


def pad_batch(encodings: list[Encoding], pad_id: int, with_type_ids: bool = True) -> dict[str, np.ndarray]:
    """Right-padded INT64 input_ids / attention_mask (/ token_type_ids) for a list of encodings."""
    length = max((len(enc.ids) for enc in encodings), default=0)
    batch = len(encodings)
    input_ids = np.full((batch, length), pad_id, dtype=np.int64)
    attention_mask = np.zeros((batch, length), dtype=np.int64)
    token_type_ids = np.zeros((batch, length), dtype=np.int64)
    for row, enc in enumerate(encodings):
        n = len(enc.ids)
        input_ids[row, :n] = enc.ids
        attention_mask[row, :n] = enc.attention_mask
        token_type_ids[row, :n] = enc.type_ids
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if with_type_ids:
        inputs["token_type_ids"] = token_type_ids
    return inputs
