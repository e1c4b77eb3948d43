"""The Open Inference Protocol (v2) wire format, for every side that speaks it.

model_service decodes requests and encodes responses and metadata with it; preproc's model
client and the client SDK (client/tensor_client.py) encode requests and decode responses and
metadata with it; preproc's own `Tensor` message (Embed) uses the same datatypes. Nothing
else builds or reads these messages.

- Tensors: numpy arrays <-> (datatype, shape, raw little-endian bytes). Raw bytes
  (`raw_input_contents` / `raw_output_contents`) are the wire format; typed `contents` are
  accepted on decode. BF16 travels as its raw 16 bits (uint16 here) and `widen_bf16` turns
  it into exact float32. BYTES elements are each a 4-byte little-endian length followed by
  the bytes (decoded as a numpy object array of `bytes`).
- Parameters: `map<string, InferParameter>` <-> plain Python values.
- `ModelMetadata`: the metadata contract, one field per key model_service publishes in
  `ModelMetadataResponse.parameters` (docs/contracts.md lists them).

Every check a peer can fail raises InvalidArgument naming the tensor or parameter.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import MISSING, dataclass, field, fields

import numpy as np

from splitserve_common.errors import InvalidArgument
from splitserve_pb import open_inference_pb2 as pb
from splitserve_pb import preproc_pb2

# ---------------------------------------------------------------- datatypes

# v2 datatype -> numpy dtype (little-endian). BF16 travels as its raw 16 bits; BYTES as objects.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "FP16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
INTEGER_DATATYPES = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})
_DATATYPE_OF_NUMPY = {dt.str: name for name, dt in NUMPY_DTYPES.items() if name not in ("BF16", "BYTES")}

# Which typed `contents` field carries each datatype (FP16 and BF16 only travel raw).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_LENGTH = struct.Struct("<I")


def v2_datatype(array: np.ndarray) -> str:
    """The v2 datatype of an array (str, bytes and object arrays are BYTES)."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    try:
        return _DATATYPE_OF_NUMPY[array.dtype.newbyteorder("<").str]
    except KeyError:
        raise InvalidArgument(f"no v2 datatype for numpy dtype {array.dtype}") from None


def numpy_dtype(datatype: str, tensor_name: str = "") -> np.dtype:
    try:
        return NUMPY_DTYPES[datatype]
    except KeyError:
        where = f" of tensor '{tensor_name}'" if tensor_name else ""
        raise InvalidArgument(
            f"unknown datatype '{datatype}'{where}; expected one of {', '.join(NUMPY_DTYPES)}"
        ) from None


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """BF16 arrives as uint16 bit patterns; widen to float32 exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------- one tensor

def _as_bytes(item) -> bytes:
    return item.encode() if isinstance(item, str) else bytes(item)


def _pack_bytes(array: np.ndarray) -> bytes:
    return b"".join(_LENGTH.pack(len(b)) + b for b in map(_as_bytes, array.reshape(-1)))


def _unpack_bytes(name: str, raw: bytes, count: int) -> list[bytes]:
    items, offset = [], 0
    view = memoryview(raw)
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidArgument(f"tensor '{name}': BYTES element {len(items)} has a truncated length prefix")
        (size,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidArgument(f"tensor '{name}': BYTES element {len(items)} says {size} bytes, "
                                  f"{len(raw) - offset} remain")
        items.append(bytes(view[offset:offset + size]))
        offset += size
    if len(items) != count:
        raise InvalidArgument(f"tensor '{name}': {len(items)} BYTES elements do not match the shape ({count})")
    return items


def to_raw(array: np.ndarray) -> tuple[str, list[int], bytes]:
    """(datatype, shape, raw little-endian bytes) for an array."""
    array = np.asarray(array)
    datatype = v2_datatype(array)
    if datatype == "BYTES":
        return datatype, list(array.shape), _pack_bytes(array)
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return datatype, list(array.shape), np.ascontiguousarray(little).tobytes()


def decode_tensor(name: str, datatype: str, shape, raw: bytes | None = None, contents=None,
                  widen_bf16: bool = False) -> np.ndarray:
    """The array of one v2 tensor, from raw bytes (preferred) or typed contents."""
    dtype = numpy_dtype(datatype, name)
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"tensor '{name}' has a negative dimension in shape {list(shape)}")
    count = math.prod(shape)
    if raw is not None:
        if datatype == "BYTES":
            values = _unpack_bytes(name, raw, count)
            array = np.empty(count, dtype=object)
            array[:] = values
        else:
            expected = count * dtype.itemsize
            if len(raw) != expected:
                raise InvalidArgument(
                    f"tensor '{name}': {len(raw)} bytes do not match shape {list(shape)} x {dtype.itemsize}-byte "
                    f"{datatype} = {expected} bytes")
            array = np.frombuffer(raw, dtype=dtype)
    else:
        field_name = _CONTENTS_FIELD.get(datatype)
        if field_name is None:
            raise InvalidArgument(f"tensor '{name}': {datatype} must be sent as raw contents")
        values = getattr(contents, field_name) if contents is not None else []
        if len(values) != count:
            raise InvalidArgument(f"tensor '{name}': {len(values)} values in {field_name} do not match shape "
                                  f"{list(shape)} ({count} values)")
        try:
            array = np.array(list(values), dtype=dtype)
        except OverflowError:
            raise InvalidArgument(f"tensor '{name}': a value in {field_name} is out of range for {datatype}") \
                from None
    try:
        array = array.reshape(shape)
    except ValueError as exc:  # e.g. a 0 beside dimensions whose product numpy cannot index
        raise InvalidArgument(f"tensor '{name}': shape {list(shape)} is not usable ({exc})") from None
    return bf16_to_float32(array) if widen_bf16 and datatype == "BF16" else array


# ---------------------------------------------------------------- parameters

def param_value(param):
    kind = param.WhichOneof("parameter_choice")
    return None if kind is None else getattr(param, kind)


def params_to_dict(param_map) -> dict:
    return {key: param_value(p) for key, p in param_map.items()}


def set_param(param_map, key: str, value) -> None:
    """Store a Python value in a protobuf map<string, InferParameter>."""
    p = param_map[key]
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    elif isinstance(value, str):
        p.string_param = value
    else:
        raise TypeError(f"parameter {key}: unsupported type {type(value).__name__}")


def set_params(param_map, values: dict | None) -> None:
    """set_param for every key whose value is not None."""
    for key, value in (values or {}).items():
        if value is not None:
            set_param(param_map, key, value)


def typed(params: dict, key: str, kind: type, default=None):
    """Fetch params[key] as `kind`, with INVALID_ARGUMENT naming the key on a wrong type."""
    if key not in params or params[key] is None:
        return default
    value = params[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(f"parameter '{key}' must be a finite number, got {value}")
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise InvalidArgument(f"parameter '{key}' must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


# ---------------------------------------------------------------- ModelInfer

class InferResult(dict):
    """{output name: numpy array}, plus the response's `parameters` (e.g. batch_size), `id` and model."""

    def __init__(self, outputs: dict, parameters: dict | None = None, request_id: str = "", model_name: str = ""):
        super().__init__(outputs)
        self.parameters = parameters or {}
        self.id = request_id
        self.model_name = model_name


def encode_request(inputs: dict, outputs=None, parameters: dict | None = None,
                   output_parameters: dict | None = None, model_name: str = "",
                   request_id: str = "") -> pb.ModelInferRequest:
    """A ModelInferRequest: named arrays as raw contents, request-level and per-output parameters."""
    request = pb.ModelInferRequest(model_name=model_name, id=request_id)
    for name, array in inputs.items():
        datatype, shape, raw = to_raw(array)
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    set_params(request.parameters, parameters)
    output_parameters = output_parameters or {}
    for name in outputs or []:
        set_params(request.outputs.add(name=name).parameters, output_parameters.get(name))
    return request


def _paired_raw(tensors, raw_contents, what: str) -> list:
    """raw entry i for tensor i (None everywhere when the peer sent typed contents)."""
    raw = list(raw_contents)
    if not raw:
        return [None] * len(tensors)
    if len(raw) != len(tensors):
        raise InvalidArgument(f"{len(raw)} raw_{what}_contents for {len(tensors)} {what}s: "
                              f"send one raw entry per {what}, in {what} order")
    return raw


def decode_request_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """{input name: array} of a ModelInferRequest."""
    raws = _paired_raw(request.inputs, request.raw_input_contents, "input")
    arrays = {}
    for tensor, raw in zip(request.inputs, raws, strict=True):
        if tensor.name in arrays:
            raise InvalidArgument(f"input '{tensor.name}' given twice")
        arrays[tensor.name] = decode_tensor(tensor.name, tensor.datatype, tensor.shape, raw, tensor.contents)
    return arrays


def encode_response(outputs: dict, model_name: str = "", model_version: str = "", request_id: str = "",
                    parameters: dict | None = None) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id)
    set_params(response.parameters, parameters)
    for name, array in outputs.items():
        datatype, shape, raw = to_raw(array)
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(raw)
    return response


def decode_response(response: pb.ModelInferResponse, widen_bf16: bool = True) -> InferResult:
    """The outputs as arrays (BF16 widened to float32 unless `widen_bf16` is False)."""
    raws = _paired_raw(response.outputs, response.raw_output_contents, "output")
    arrays = {out.name: decode_tensor(out.name, out.datatype, out.shape, raw, out.contents, widen_bf16)
              for out, raw in zip(response.outputs, raws, strict=True)}
    return InferResult(arrays, params_to_dict(response.parameters), response.id, response.model_name)


# ---------------------------------------------------------------- preproc's Tensor (Embed)

PREPROC_TENSOR_DATATYPES = ("FP32", "FP16")


def to_preproc_tensor(array: np.ndarray) -> preproc_pb2.Tensor:
    """A float array as preproc's Tensor: FP16 stays FP16, any other float goes as FP32."""
    array = np.asarray(array)
    if array.dtype != np.float16:
        array = array.astype(np.float32, copy=False)
    datatype, shape, raw = to_raw(array)
    return preproc_pb2.Tensor(datatype=datatype, shape=shape, data=raw)


def from_preproc_tensor(tensor: preproc_pb2.Tensor) -> np.ndarray:
    if tensor.datatype not in PREPROC_TENSOR_DATATYPES:
        raise InvalidArgument(f"preproc Tensor datatype must be FP32 or FP16, got '{tensor.datatype}'")
    return decode_tensor("embedding", tensor.datatype, tensor.shape, tensor.data)


# ---------------------------------------------------------------- model metadata

@dataclass(frozen=True)
class _Key:
    """How one ModelMetadata field travels: its parameter key and its encoding."""
    name: str
    kind: str = "plain"  # plain | optional_int (-1 = none) | json | csv | id2label


def _encode_value(kind: str, value):
    if kind == "optional_int":
        return -1 if value is None else int(value)
    if kind == "json":
        return json.dumps(value)
    if kind == "csv":
        return ",".join(value)
    if kind == "id2label":
        return json.dumps({str(k): v for k, v in value.items()})
    return value


def _decode_value(kind: str, value, default):
    if value is None or value == "":
        return default
    if kind == "optional_int":
        return None if int(value) < 0 else int(value)
    if kind in ("json", "id2label"):
        try:
            value = json.loads(value)
        except ValueError:
            raise InvalidArgument(f"model metadata holds invalid JSON: {value!r}") from None
        return {int(k): v for k, v in value.items()} if kind == "id2label" else value
    if kind == "csv":
        return [part for part in value.split(",") if part]
    return value


def _key(name: str = "", kind: str = "plain", default=None, factory=None):
    """A ModelMetadata field carried as the parameter `name` (default: the field's own name)."""
    extra = {"default_factory": factory} if factory is not None else {"default": default}
    return field(metadata={"key": _Key(name, kind)}, **extra)


@dataclass
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]


@dataclass
class ModelMetadata:
    """ModelMetadataResponse, typed: the contract between model_service and its callers.

    The fields made with `_key` travel in `parameters` (one key each; docs/contracts.md).
    """
    name: str = ""
    versions: list[str] = field(default_factory=lambda: ["1"])
    platform: str = ""
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    task: str = _key(default="")
    inference_task: str = _key(default="")
    model_type: str = _key(default="")
    architecture: str = _key(default="")
    id2label: dict[int, str] = _key(kind="id2label", factory=dict)
    problem_type: str = _key(default="")
    num_labels: int = _key(default=0)
    max_position_embeddings: int = _key(default=0)  # usable input length (0: unknown)
    dtype: str = _key(default="")
    device: str = _key(default="")
    vocab_size: int = _key(default=0)
    pad_token_id: int | None = _key(kind="optional_int")
    bos_token_id: int | None = _key(kind="optional_int")
    eos_token_ids: list[int] = _key("eos_token_id", "json", factory=list)
    decoder_start_token_id: int | None = _key(kind="optional_int")
    is_encoder_decoder: bool = _key(default=False)
    type_vocab_size: int = _key(default=0)
    pooling: dict = _key(kind="json", factory=dict)  # {"mode": ..., "normalize": ...}
    adapters: list[str] = _key(kind="json", factory=list)
    default_adapter: str = _key(default="")
    max_batch_size: int = _key(default=0)  # most rows in one request (0: no limit known)
    max_queue_rows: int = _key(default=0)  # most rows waiting at once; a request needing more never runs
    default_outputs: list[str] = _key(kind="csv", factory=list)  # returned when a request names none
    main_input: str = _key(default="input_ids")  # input_ids, or input_values (audio models)
    max_input_values: int = _key(default=0)  # audio models: most samples per input_values row (0: no limit)
    inputs_to_logits_ratio: int = _key(default=1)  # audio models: input samples per output frame
    return_timestamps: bool = _key(default=False)  # Whisper: its generation config's return_timestamps
    aggregation_labels: dict[int, str] = _key(kind="id2label", factory=dict)  # TAPAS aggregation head
    no_aggregation_label_index: int | None = _key(kind="optional_int")

    @property
    def labels(self) -> list[str]:
        return [self.id2label[i] for i in sorted(self.id2label)]

    def parameters(self) -> dict:
        """{parameter key: wire value} for ModelMetadataResponse.parameters."""
        return {spec.name or f.name: _encode_value(spec.kind, getattr(self, f.name))
                for f, spec in _parameter_fields()}

    def to_response(self) -> pb.ModelMetadataResponse:
        response = pb.ModelMetadataResponse(name=self.name, versions=list(self.versions), platform=self.platform)
        for spec in self.inputs:
            response.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        for spec in self.outputs:
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        set_params(response.parameters, self.parameters())
        return response

    @classmethod
    def from_response(cls, response: pb.ModelMetadataResponse) -> ModelMetadata:
        """Unknown parameter keys are ignored (a newer server may publish more)."""
        params = params_to_dict(response.parameters)
        values = {}
        for f, spec in _parameter_fields():
            default = f.default if f.default_factory is MISSING else f.default_factory()
            values[f.name] = _decode_value(spec.kind, params.get(spec.name or f.name), default)
        return cls(name=response.name, versions=list(response.versions), platform=response.platform,
                   inputs=[TensorSpec(t.name, t.datatype, list(t.shape)) for t in response.inputs],
                   outputs=[TensorSpec(t.name, t.datatype, list(t.shape)) for t in response.outputs], **values)


def _parameter_fields():
    return [(f, f.metadata["key"]) for f in fields(ModelMetadata) if "key" in f.metadata]
