"""Turn a v2 ModelInferRequest into an InferJob: unpadded rows + the outputs to return.

Every check a client can fail is here and raises InvalidArgument (or NotFound for the
model name) with a message naming the tensor or parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model_service.inputs import InputSpec
from model_service.shaping import SEQUENCE_OUTPUTS, OutputSpec, answer_bytes, parse_specs
from splitserve_common import v2_codec
from splitserve_common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

MiB = 1024 * 1024
# Room in the answer message for what is not tensor data (names, shapes, parameters).
ANSWER_OVERHEAD_BYTES = 64 * 1024
FLOAT_DATATYPES = frozenset({"FP16", "BF16", "FP32", "FP64"})


@dataclass
class InferJob:
    request_id: str
    rows: list[np.ndarray]                 # the main input (token ids, or audio samples), one unpadded row each
    type_rows: list[np.ndarray] | None     # token_type_ids per row ([n] or TAPAS' [n, K]), when sent
    padded_length: int                     # the request's L: outputs come back [B, L, ...]
    outputs: list[OutputSpec]
    adapter: str = ""
    main_input: str = "input_ids"
    # Audio rows: batched only with rows of the same length and never cut back along an axis
    # (their outputs run over frames, not input positions); `with_mask`: pass an attention_mask.
    exact_length: bool = False
    with_mask: bool = True
    per_token: frozenset = SEQUENCE_OUTPUTS  # 2-D outputs cut back along axis 1 like [B, L, ...] ones

    @property
    def batch(self) -> int:
        return len(self.rows)


def check_model_name(info, name: str, version: str = "") -> None:
    if name and name != info.name:
        raise NotFound(f"model '{name}' is not served here; this server serves '{info.name}'")
    if version and version not in info.versions:
        raise NotFound(f"model '{info.name}' has no version '{version}'; versions: {', '.join(info.versions)}")


def decode_inputs(request, specs: dict[str, InputSpec]) -> dict[str, np.ndarray]:
    """The request's inputs checked against the model's `specs` (main input first)."""
    for tensor in request.inputs:  # names and datatypes first, before any decoding
        spec = specs.get(tensor.name)
        if spec is None:
            raise InvalidArgument(f"unknown input '{tensor.name}'; expected {', '.join(specs)}")
        v2_codec.numpy_dtype(tensor.datatype, tensor.name)  # unknown datatype -> INVALID_ARGUMENT
        if spec.floating and tensor.datatype not in FLOAT_DATATYPES:
            raise InvalidArgument(f"input '{tensor.name}' must be a float tensor (FP32), got {tensor.datatype}")
        if not spec.floating and tensor.datatype not in v2_codec.INTEGER_DATATYPES:
            raise InvalidArgument(f"input '{tensor.name}' must be an integer tensor (INT64), got {tensor.datatype}")
    arrays = v2_codec.decode_request_inputs(request)
    for name, array in arrays.items():
        wanted = list(specs[name].shape)
        if array.ndim != len(wanted) or any(w != -1 and w != d for w, d in zip(wanted, array.shape, strict=True)):
            raise InvalidArgument(f"input '{name}' must have rank {len(wanted)} (shape {wanted}, -1: any "
                                  f"size), got shape {list(array.shape)}")
        arrays[name] = array.astype(np.float32 if specs[name].floating else np.int64, copy=False)
    main = next(iter(specs))
    if main not in arrays:
        raise InvalidArgument(f"input '{main}' is required")
    shape = arrays[main].shape
    for name, array in arrays.items():
        if array.shape[:2] != shape[:2]:
            raise InvalidArgument(f"input '{name}' has shape {list(array.shape)} but {main} has {list(shape)}")
    if 0 in shape:
        raise InvalidArgument(f"{main} shape {list(shape)} is empty")
    if specs[main].floating and not np.isfinite(arrays[main]).all():
        raise InvalidArgument(f"input '{main}' holds NaN or infinite values")
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


def check_token_types(type_ids: np.ndarray, config, type_vocab_size: int) -> None:
    """Every token type within its vocabulary: one size, or TAPAS' size per column."""
    sizes = getattr(config, "type_vocab_sizes", None)
    if type_ids.ndim == 3:
        for column, limit in enumerate(sizes):
            values = type_ids[..., column]
            if values.min() < 0 or values.max() >= limit:
                raise InvalidArgument(f"token_type_ids column {column} must be in [0, {limit})")
        return
    if not type_vocab_size:
        raise InvalidArgument("this model takes no token_type_ids")
    if type_ids.min() < 0 or type_ids.max() >= type_vocab_size:
        raise InvalidArgument(f"token_type_ids must be in [0, {type_vocab_size})")


def parse(request, info) -> InferJob:
    """Validate `request` against the served model `info` (model_service.served_model.ServedModel)."""
    check_model_name(info, request.model_name, request.model_version)
    if not info.outputs:
        raise FailedPrecondition(f"model '{info.name}' ({info.loaded.architecture}) has no ModelInfer outputs: "
                                 "use the Generation service")
    inputs = info.input_specs
    main = next(iter(inputs))
    arrays = decode_inputs(request, inputs)
    ids = arrays[main]
    batch, length = ids.shape[:2]
    if batch > info.max_batch_size:
        raise InvalidArgument(f"batch of {batch} rows is over the limit of {info.max_batch_size} (--max-batch-size)")
    lengths = row_lengths(arrays.get("attention_mask"), ids.shape[:2])
    longest = int(lengths.max())
    if inputs[main].floating:
        if int(lengths.min()) != length:
            raise InvalidArgument(f"{main} rows must be whole, unpadded clips of one length (attention_mask all "
                                  "ones): send clips of other lengths in requests of their own")
        if info.max_input_values and length > info.max_input_values:
            raise InvalidArgument(f"{main} rows of {length} values are longer than the limit of "
                                  f"{info.max_input_values} (--max-input-values)")
    elif info.max_positions and longest > info.max_positions:
        raise InvalidArgument(f"sequence of {longest} tokens is longer than the model's {info.max_positions} "
                              "positions: truncate it")
    vocab = info.loaded.vocab_size
    if not inputs[main].floating and vocab and (ids.min() < 0 or ids.max() >= vocab):
        raise InvalidArgument(f"input_ids hold token ids outside the vocabulary [0, {vocab})")
    type_ids = arrays.get("token_type_ids")
    if type_ids is not None:
        check_token_types(type_ids, info.loaded.config, info.loaded.type_vocab_size)
    specs = parse_specs(request, info.output_names, info.default_outputs, info.loaded.pooling.as_dict(), length)
    if not inputs[main].floating:  # audio outputs run along frames, not input values (--max-input-values)
        check_answer_size(specs, info, batch, length)
    adapter = v2_codec.typed(v2_codec.params_to_dict(request.parameters), "adapter", str, "")
    return InferJob(
        request_id=request.id,
        rows=[ids[i, : lengths[i]] for i in range(batch)],
        main_input=main, exact_length=inputs[main].floating,
        with_mask=not inputs[main].floating or "attention_mask" in arrays, per_token=info.per_token_outputs,
        type_rows=None if type_ids is None else [type_ids[i, : lengths[i]] for i in range(batch)],
        padded_length=length,
        outputs=specs,
        adapter=adapter,
    )
