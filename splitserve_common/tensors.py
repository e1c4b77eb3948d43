"""numpy arrays <-> Open Inference Protocol (v2) tensors.

Raw little-endian bytes are the wire format (`raw_input_contents` /
`raw_output_contents`); typed `contents` are accepted on input for clients that
use them. Every check that a client can fail raises InvalidArgument naming the tensor.
"""

from __future__ import annotations

import math

import numpy as np

from splitserve_common.errors import InvalidArgument

# v2 datatype -> numpy dtype (little-endian). BF16 travels as its raw 16 bits.
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
}
_V2_OF_NUMPY = {dt.str: name for name, dt in NUMPY_DTYPES.items() if name != "BF16"}
_V2_OF_NUMPY[np.dtype(np.bool_).str] = "BOOL"

# Largest byte count numpy allows an array's shape to describe.
_MAX_BYTES = np.iinfo(np.intp).max

# Which typed `contents` field carries each datatype.
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
}


def v2_datatype(array: np.ndarray) -> str:
    try:
        return _V2_OF_NUMPY[array.dtype.newbyteorder("<").str if array.dtype.byteorder == ">" else array.dtype.str]
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


def decode(name: str, datatype: str, shape, raw: bytes | None = None, contents=None) -> np.ndarray:
    """Build the array for one v2 tensor from raw bytes (preferred) or typed contents."""
    dtype = numpy_dtype(datatype, name)
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"tensor '{name}' has a negative dimension in shape {list(shape)}")
    count = math.prod(shape)
    # numpy refuses a shape whose nonzero dimensions alone overflow its byte count, even with
    # a 0 among them ("array is too big").
    if math.prod(d for d in shape if d) * dtype.itemsize > _MAX_BYTES:
        raise InvalidArgument(f"tensor '{name}': shape {list(shape)} is too large")
    if raw is not None:
        expected = count * dtype.itemsize
        if len(raw) != expected:
            raise InvalidArgument(
                f"tensor '{name}': {len(raw)} bytes do not match shape {list(shape)} x {dtype.itemsize}-byte "
                f"{datatype} = {expected} bytes"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidArgument(f"tensor '{name}': {datatype} must be sent as raw_input_contents")
    values = getattr(contents, field) if contents is not None else []
    if len(values) != count:
        raise InvalidArgument(
            f"tensor '{name}': {len(values)} values in {field} do not match shape {list(shape)} ({count} values)"
        )
    return _typed_values(name, datatype, dtype, values).reshape(shape)


def _typed_values(name: str, datatype: str, dtype: np.dtype, values) -> np.ndarray:
    """Typed `contents` as `dtype`; INVALID_ARGUMENT when a value does not fit the datatype
    (the contents fields are wider than INT8/INT16/UINT8/UINT16)."""
    if dtype.kind not in "iu":
        return np.asarray(values, dtype=dtype)
    wide = np.asarray(values, dtype=np.uint64 if dtype.kind == "u" else np.int64)
    limits = np.iinfo(dtype)
    if wide.size and (wide.min() < limits.min or wide.max() > limits.max):
        raise InvalidArgument(f"tensor '{name}': {datatype} values must be in [{limits.min}, {limits.max}]")
    return wide.astype(dtype)


def to_raw(array: np.ndarray) -> tuple[str, list[int], bytes]:
    """(datatype, shape, raw little-endian bytes) for an array."""
    datatype = v2_datatype(array)
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return datatype, list(array.shape), np.ascontiguousarray(little).tobytes()


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """BF16 arrives as uint16 bit patterns; widen to float32 exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)
