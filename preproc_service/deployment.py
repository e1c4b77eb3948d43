"""Everything a request handler needs about the served model, in one object.

`Deployment` joins preproc's half of the model directory (tokenizer, MLflow defaults)
with what model_service said in its metadata (labels, limits, special ids:
splitserve_common.v2_codec.ModelMetadata). Task
handlers and the generation handlers receive it; `forward` is their one way to the model.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from preproc_service.audio import AudioSettings
from preproc_service.limits import RequestLimits
from preproc_service.model_client import ModelClient
from preproc_service.model_dir import ModelDir
from preproc_service.model_room import ModelRoom
from preproc_service.precedence import Precedence
from preproc_service.tokenization import Tokenization, pad_batch
from splitserve_common import metrics, tasks
from splitserve_common.errors import FailedPrecondition, InvalidArgument, Unavailable
from splitserve_common.memory import MemoryReleaser
from splitserve_common.v2_codec import ModelMetadata


@dataclass(frozen=True)
class TableLimits:
    """table-question-answering request sizes (--max-table-cells, --max-table-queries)."""
    max_cells: int = 10000
    max_queries: int = 64


@dataclass
class RequestScope:
    """What one request carries through its stages: adapter, time left, stage timings."""
    adapter: str = ""
    timeout: float | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self._deadline = None if self.timeout is None else time.monotonic() + self.timeout

    def remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def stage(self, name: str):
        return _Stage(self.timings_ms, name)


class _Stage:
    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        seconds = time.perf_counter() - self.start
        self.timings[self.name] = self.timings.get(self.name, 0.0) + seconds * 1e3
        # Prometheus stage histogram; the "model" stage is the hop to model_service.
        metrics.observe_stage("hop" if self.name == "model" else self.name, seconds)


async def all_or_nothing(awaitables) -> list:
    """Their results in order, run at once; when one fails (or the caller is cancelled) the others are
    cancelled before the error is raised, so a failed request takes all of its model calls with it."""
    running = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*running)
    except BaseException:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        raise


class Deployment:
    def __init__(self, model_dir: ModelDir, tokenizer, model: ModelClient, task_override: str = "",
                 tokenize_batch: int = 512, feature_extractor=None, audio: AudioSettings | None = None,
                 table_limits: TableLimits | None = None, limits: RequestLimits | None = None,
                 tokenize_round_chars: int = 16384, release_memory_seconds: float = 0.0,
                 tokenize_bulk_nice: int = 0, model_room: ModelRoom | None = None):
        self.model_dir = model_dir
        self.model_room = model_room or ModelRoom()
        self.limits = limits or RequestLimits()
        self.tokenizer = tokenizer          # None for models without one (audio-classification)
        self.feature_extractor = feature_extractor  # audio models
        self.audio = audio or AudioSettings()
        self.table_limits = table_limits or TableLimits()
        self.model = model
        self.task_override = tasks.canonical(task_override)
        self.info: ModelMetadata | None = None
        self.disagreement: str | None = None  # why tokenizer and model do not match (handshake), or None
        self.precedence = Precedence(model_dir.model_config, model_dir.signature_params)
        self._tokenize_batch = tokenize_batch
        # After tokenizing and after each call, free memory goes back to the system (splitserve_common/memory.py).
        self.memory = MemoryReleaser(release_memory_seconds)
        self.model_calls = 0  # calls to model_service in flight (a lone request is tokenized inline only with none)
        # Micro-batched Rust tokenization for fast tokenizers; slow ones (TAPAS, CTC) are called directly.
        fast = getattr(tokenizer, "is_fast", False)
        self.tokenization = Tokenization(tokenizer, self._local_max_length(), tokenize_batch,
                                         tokenize_round_chars, self.memory, tokenize_bulk_nice,
                                         crowded=lambda: self.model_calls > 0) if fast else None

    @property
    def task(self) -> str:
        """The served task: flag, else the directory, else what model_service reports."""
        return self.task_override or self.model_dir.task or (self.info.task if self.info else "")

    @property
    def model_name(self) -> str:
        return (self.info.name if self.info and self.info.name else "") or self.model_dir.path.name

    @property
    def max_length(self) -> int:
        return self.tokenization.max_length if self.tokenization else self._local_max_length(
            self.info.max_position_embeddings if self.info else None)

    def _local_max_length(self, model_limit: int | None = None) -> int:
        limits = [getattr(self.tokenizer, "model_max_length", None), self.model_dir.max_seq_length, model_limit]
        usable = [int(x) for x in limits if x and 0 < x < 1_000_000]
        return min(usable) if usable else 512

    def set_model_info(self, info: ModelMetadata) -> None:
        self.info = info
        if self.tokenization:
            self.tokenization.max_length = self._local_max_length(info.max_position_embeddings)

    def require_agreement(self) -> None:
        """FAILED_PRECONDITION while the handshake finds tokenizer and model disagree (health NOT_SERVING)."""
        if self.disagreement:
            raise FailedPrecondition(f"tokenizer and model at {self.model.address} disagree: {self.disagreement}; "
                                     "this preproc_service is NOT_SERVING until they match")

    def require_info(self) -> ModelMetadata:
        if self.info is None:
            raise Unavailable(f"model service at {self.model.address} has not answered the handshake yet")
        return self.info

    @property
    def uses_token_type_ids(self) -> bool:
        return "token_type_ids" in getattr(self.tokenizer, "model_input_names", [])

    def pad(self, encodings: list) -> dict[str, np.ndarray]:
        """Encodings as the model's padded arrays: input_ids, attention_mask (+ token_type_ids if it takes them)."""
        return pad_batch(encodings, self.tokenization.pad_token_id, self.uses_token_type_ids)

    def room_for(self, rows: int, scope: RequestScope):
        """Room in model_service's queue for a request of at least `rows` model rows, held while the body
        runs; taken before tokenizing (model_room.py)."""
        info = self.info
        return self.model_room.rows(rows, info.max_queue_rows if info else 0, info.max_batch_size if info else 0,
                                    scope.remaining())

    async def forward(self, scope: RequestScope, inputs: dict[str, np.ndarray], outputs: list[str] | None = None,
                      parameters: dict | None = None, output_parameters: dict | None = None) -> dict[str, np.ndarray]:
        parameters = dict(parameters or {})
        if scope.adapter:
            parameters["adapter"] = scope.adapter
        rows = len(next(iter(inputs.values())))
        limit = self.info.max_batch_size if self.info is not None else 0
        queue = self.info.max_queue_rows if self.info is not None else 0
        if queue and rows > queue:
            raise InvalidArgument(f"this request needs {rows} model rows, more than the model service's whole queue "
                                  f"holds ({queue} rows, its --max-queue-rows): send fewer or shorter inputs")
        self.model_calls += 1
        try:
            with scope.stage("model"):
                if not limit or rows <= limit:
                    return await self.model.infer(inputs, parameters, outputs, output_parameters,
                                                  timeout=scope.remaining())
                # More rows than model_service takes in one request: send them in slices at once (its
                # batcher recombines them with other traffic) and stack the answers in row order.
                slices = [{name: array[start:start + limit] for name, array in inputs.items()}
                          for start in range(0, rows, limit)]
                answers = await all_or_nothing(self.model.infer(part, parameters, outputs, output_parameters,
                                                                timeout=scope.remaining()) for part in slices)
                return {name: np.concatenate([answer[name] for answer in answers]) for name in answers[0]}
        finally:
            self.model_calls -= 1

    def close(self) -> None:
        self.memory.close()
        if self.tokenization:
            self.tokenization.close()
