"""Everything a request handler needs about the served model, in one object.

`Deployment` joins preproc's half of the model directory (tokenizer, MLflow defaults)
with what model_service said in its metadata (labels, limits, special ids). Task
handlers and the generation handlers receive it; `forward` is their one way to the model.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from preproc_service.model_client import ModelClient
from preproc_service.model_dir import ModelDir
from preproc_service.precedence import Precedence
from preproc_service.tokenization import Tokenization
from splitserve_common import metrics, tasks
from splitserve_common.errors import Unavailable


@dataclass
class ModelInfo:
    """model_service metadata (docs/contracts.md), typed."""
    name: str = ""
    task: str = ""
    inference_task: str = ""
    model_type: str = ""
    id2label: dict[int, str] = field(default_factory=dict)
    problem_type: str | None = None
    num_labels: int = 0
    max_length: int | None = None
    vocab_size: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pooling: dict = field(default_factory=dict)
    adapters: list[str] = field(default_factory=list)
    max_batch_size: int = 0  # most rows model_service takes in one request (0: no limit known)

    @classmethod
    def from_metadata(cls, meta: dict) -> ModelInfo:
        id2label = {int(k): v for k, v in (meta.get("id2label") or {}).items()}
        eos = meta.get("eos_token_id")
        eos_list = [] if eos is None or eos == "" else [int(x) for x in (eos if isinstance(eos, list) else [eos])]

        def opt_int(key):
            value = meta.get(key)
            return None if value is None or value == "" or (isinstance(value, int) and value < 0) else int(value)

        return cls(
            name=meta.get("name", ""), task=tasks.canonical(meta.get("task")),
            inference_task=meta.get("inference_task") or "", model_type=meta.get("model_type") or "",
            id2label=id2label, problem_type=meta.get("problem_type") or None,
            num_labels=int(meta.get("num_labels") or len(id2label)), max_length=opt_int("max_position_embeddings"),
            vocab_size=opt_int("vocab_size"), pad_token_id=opt_int("pad_token_id"),
            bos_token_id=opt_int("bos_token_id"), eos_token_ids=eos_list,
            pooling=meta.get("pooling") if isinstance(meta.get("pooling"), dict) else {},
            adapters=list(meta.get("adapters") or []), max_batch_size=opt_int("max_batch_size") or 0,
        )

    @property
    def labels(self) -> list[str]:
        return [self.id2label[i] for i in sorted(self.id2label)]


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


class Deployment:
    def __init__(self, model_dir: ModelDir, tokenizer, model: ModelClient, task_override: str = "",
                 tokenize_batch: int = 512):
        self.model_dir = model_dir
        self.tokenizer = tokenizer
        self.model = model
        self.task_override = tasks.canonical(task_override)
        self.info: ModelInfo | None = None
        self.precedence = Precedence(model_dir.model_config, model_dir.signature_params)
        self._tokenize_batch = tokenize_batch
        self.tokenization = Tokenization(tokenizer, self._local_max_length(), tokenize_batch)

    @property
    def task(self) -> str:
        """The served task: flag, else the directory, else what model_service reports."""
        return self.task_override or self.model_dir.task or (self.info.task if self.info else "")

    @property
    def model_name(self) -> str:
        return (self.info.name if self.info and self.info.name else "") or self.model_dir.path.name

    @property
    def max_length(self) -> int:
        return self.tokenization.max_length

    def _local_max_length(self, model_limit: int | None = None) -> int:
        limits = [self.tokenizer.model_max_length, self.model_dir.max_seq_length, model_limit]
        usable = [int(x) for x in limits if x and 0 < x < 1_000_000]
        return min(usable) if usable else 512

    def set_model_info(self, info: ModelInfo) -> None:
        self.info = info
        self.tokenization.max_length = self._local_max_length(info.max_length)

    def require_info(self) -> ModelInfo:
        if self.info is None:
            raise Unavailable(f"model service at {self.model.address} has not answered the handshake yet")
        return self.info

    @property
    def uses_token_type_ids(self) -> bool:
        return "token_type_ids" in getattr(self.tokenizer, "model_input_names", [])

    async def forward(self, scope: RequestScope, inputs: dict[str, np.ndarray], outputs: list[str] | None = None,
                      parameters: dict | None = None, output_parameters: dict | None = None) -> dict[str, np.ndarray]:
        parameters = dict(parameters or {})
        if scope.adapter:
            parameters["adapter"] = scope.adapter
        rows = len(inputs["input_ids"])
        limit = self.info.max_batch_size if self.info is not None else 0
        with scope.stage("model"):
            if not limit or rows <= limit:
                return await self.model.infer(inputs, parameters, outputs, output_parameters,
                                              timeout=scope.remaining())
            # More rows than model_service takes in one request: send them in slices at once (its
            # batcher recombines them with other traffic) and stack the answers in row order.
            slices = [{name: array[start:start + limit] for name, array in inputs.items()}
                      for start in range(0, rows, limit)]
            answers = await asyncio.gather(*(self.model.infer(part, parameters, outputs, output_parameters,
                                                              timeout=scope.remaining()) for part in slices))
            return {name: np.concatenate([answer[name] for answer in answers]) for name in answers[0]}

    def close(self) -> None:
        self.tokenization.close()
