"""Read v2 `InferParameter` maps into plain Python values, and back."""

from __future__ import annotations

import math

from splitserve_common.errors import InvalidArgument


def value_of(param):
    kind = param.WhichOneof("parameter_choice")
    return None if kind is None else getattr(param, kind)


def to_dict(param_map) -> dict:
    return {key: value_of(p) for key, p in param_map.items()}


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
