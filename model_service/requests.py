"""Turn a v2 ModelInferRequest into an InferJob: unpadded rows + the outputs to return.

Every check a client can fail is here and raises InvalidArgument (or NotFound for the
model name) with a message naming the tensor or parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model_service.shaping import OutputSpec, answer_bytes, parse_specs
from splitserve_common import v2_codec
from splitserve_common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
MiB = 1024 * 1024
# Room in the answer message for what is not tensor data (names, shapes, parameters).
ANSWER_OVERHEAD_BYTES = 64 * 1024


@dataclass
class InferJob:
    request_id: str
    rows: list[np.ndarray]                 # int64 token ids, one unpadded row per sequence
    type_rows: list[np.ndarray] | None     # token_type_ids per row, when sent
    padded_length: int                     # the request's L: outputs come back [B, L, ...]
    outputs: list[OutputSpec]
    adapter: str = ""

    @property
    def batch(self) -> int:
        return len(self.rows)


def check_model_name(info, name: str, version: str = "") -> None:
    if name and name != info.name:
        raise NotFound(f"model '{name}' is not served here; this server serves '{info.name}'")
    if version and version not in info.versions:
        raise NotFound(f"model '{info.name}' has no version '{version}'; versions: {', '.join(info.versions)}")


def decode_inputs(request) -> dict[str, np.ndarray]:
    for tensor in request.inputs:  # names and datatypes first, before any decoding
        if tensor.name not in INPUT_NAMES:
            raise InvalidArgument(f"unknown input '{tensor.name}'; expected {', '.join(INPUT_NAMES)}")
        v2_codec.numpy_dtype(tensor.datatype, tensor.name)  # unknown datatype -> INVALID_ARGUMENT
        if tensor.datatype not in v2_codec.INTEGER_DATATYPES:
            raise InvalidArgument(f"input '{tensor.name}' must be an integer tensor (INT64), got {tensor.datatype}")
    arrays = v2_codec.decode_request_inputs(request)
    for name, array in arrays.items():
        if array.ndim != 2:
            raise InvalidArgument(f"input '{name}' must have rank 2 [batch, length], got shape {list(array.shape)}")
        arrays[name] = array.astype(np.int64, copy=False)
    if "input_ids" not in arrays:
        raise InvalidArgument("input 'input_ids' is required")
    shape = arrays["input_ids"].shape
    for name, array in arrays.items():
        if array.shape != shape:
            raise InvalidArgument(f"input '{name}' has shape {list(array.shape)} but input_ids has {list(shape)}")
    if shape[0] == 0 or shape[1] == 0:
        raise InvalidArgument(f"input_ids shape {list(shape)} is empty")
    return arrays


def row_lengths(mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    if mask is None or mask.all():  # no padding: the common single-sequence case, one reduction
        return np.full(shape[0], shape[1], dtype=np.int64)
    lengths = mask.sum(axis=1)
    expected = (np.arange(shape[1])[None, :] < lengths[:, None]).astype(mask.dtype)
    if not np.array_equal(mask, expected):  # a valid mask is exactly its row lengths' ones then zeros
        if not ((mask == 0) | (mask == 1)).all():
            raise InvalidArgument("attention_mask must hold only 0 and 1")
        raise InvalidArgument("attention_mask must be right-padded: ones for the tokens, then zeros")
    if (lengths == 0).any():
        raise InvalidArgument(f"row(s) {np.flatnonzero(lengths == 0).tolist()} have no tokens (attention_mask all 0)")
    return lengths


def check_answer_size(specs, info, batch: int, length: int) -> None:
    """Refuse, before any compute, an answer that could not be sent (over the message limit)."""
    size = answer_bytes(specs, info.outputs, batch, length)
    limit = info.max_message_bytes
    if limit and size + ANSWER_OVERHEAD_BYTES > limit:
        raise ResourceExhausted(
            f"the answer would hold {size} bytes of outputs, over the {limit // MiB} MiB message limit "
            "(--max-message-mb): send fewer rows or shorter ones, or shrink the outputs (top_k, gather_positions, "
            "pooling, datatype FP16)")


def parse(request, info) -> InferJob:
    """Validate `request` against the served model `info` (model_service.model_info.ModelInfo)."""
    check_model_name(info, request.model_name, request.model_version)
    if not info.outputs:
        raise FailedPrecondition(f"model '{info.name}' ({info.loaded.architecture}) has no ModelInfer outputs: "
                                 "use the Generation service")
    arrays = decode_inputs(request)
    ids = arrays["input_ids"]
    batch, length = ids.shape
    if batch > info.max_batch_size:
        raise InvalidArgument(f"batch of {batch} rows is over the limit of {info.max_batch_size} (--max-batch-size)")
    lengths = row_lengths(arrays.get("attention_mask"), ids.shape)
    longest = int(lengths.max())
    if info.max_positions and longest > info.max_positions:
        raise InvalidArgument(f"sequence of {longest} tokens is longer than the model's {info.max_positions} "
                              "positions: truncate it")
    vocab = info.loaded.vocab_size
    if vocab and (ids.min() < 0 or ids.max() >= vocab):
        raise InvalidArgument(f"input_ids hold token ids outside the vocabulary [0, {vocab})")
    type_ids = arrays.get("token_type_ids")
    if type_ids is not None:
        limit = info.loaded.type_vocab_size
        if not limit:
            raise InvalidArgument("this model takes no token_type_ids")
        if type_ids.min() < 0 or type_ids.max() >= limit:
            raise InvalidArgument(f"token_type_ids must be in [0, {limit})")
    specs = parse_specs(request, info.output_names, info.default_outputs, info.loaded.pooling.as_dict(), length)
    check_answer_size(specs, info, batch, length)
    adapter = v2_codec.typed(v2_codec.params_to_dict(request.parameters), "adapter", str, "")
    return InferJob(
        request_id=request.id,
        rows=[ids[i, : lengths[i]] for i in range(batch)],
        type_rows=None if type_ids is None else [type_ids[i, : lengths[i]] for i in range(batch)],
        padded_length=length,
        outputs=specs,
        adapter=adapter,
    )
