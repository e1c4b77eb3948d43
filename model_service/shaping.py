"""Server-side output shaping, chosen per request (docs/contracts.md, "Request parameters").

`parse_specs` turns a request's parameters into one OutputSpec per output to return;
`shape` applies a spec to the request's own tensor ([B, L, ...] with zeros past each row's
length): pooling -> gather_positions -> top_k -> datatype cast. Runs on the engine's
worker thread, on torch tensors, so only what the caller asked for is copied out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from splitserve_common.errors import InvalidArgument
from splitserve_common.v2_codec import params_to_dict, typed

# Request parameters this service understands (anything else is refused).
SHAPING_KEYS = {"top_k", "gather_positions", "pooling", "normalize", "datatype"}
REQUEST_KEYS = SHAPING_KEYS | {"adapter"}
# Keys stock v2 clients may send on their own; accepted and ignored.
IGNORED_KEYS = {"binary_data", "binary_data_output", "priority", "timeout", "sequence_id", "sequence_start",
                "sequence_end", "headers"}
POOLING_MODES = ("mean", "cls", "max")
DERIVED = "sentence_embedding"
# 2-D outputs that still run along the sequence axis ([B, L]); TAPAS adds its per-token `logits`.
SEQUENCE_OUTPUTS = frozenset({"start_logits", "end_logits"})


@dataclass(frozen=True)
class OutputSpec:
    name: str
    top_k: int = 0
    gather_positions: tuple[int, ...] | None = None
    pooling: str = "mean"
    normalize: bool = False
    datatype: str = "FP32"

    @property
    def source(self) -> str:
        """The model output this one is computed from."""
        return "last_hidden_state" if self.name == DERIVED else self.name


def has_sequence_axis(name: str, ndim: int, per_token: frozenset = SEQUENCE_OUTPUTS) -> bool:
    """Axis 1 runs over input positions: every output of rank >= 3, and the 2-D ones in `per_token`."""
    return name in per_token or ndim >= 3


def _check_keys(params: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(params) - allowed - IGNORED_KEYS)
    if unknown:
        raise InvalidArgument(f"unknown parameter(s) {', '.join(map(repr, unknown))} in {where}; "
                              f"known: {', '.join(sorted(allowed))}")


def _settings(params: dict, base: dict, padded_length: int) -> dict:
    out = dict(base)
    top_k = typed(params, "top_k", int)
    if top_k is not None:
        if top_k < 0:
            raise InvalidArgument(f"parameter 'top_k' must be >= 0, got {top_k}")
        out["top_k"] = top_k
    gather = typed(params, "gather_positions", str)
    if gather is not None:
        count = gather.count(",") + 1
        if count > padded_length:  # more positions than the input has only repeats them: refuse before parsing
            raise InvalidArgument(f"parameter 'gather_positions' lists {count} positions; at most the input "
                                  f"length, {padded_length}")
        try:
            positions = tuple(int(p) for p in gather.split(",") if p.strip())
        except ValueError:
            raise InvalidArgument(f"parameter 'gather_positions' must be comma-separated ints, got {gather!r}") \
                from None
        bad = [p for p in positions if not 0 <= p < padded_length]
        if bad:
            raise InvalidArgument(f"gather_positions {bad} outside the input length {padded_length}")
        out["gather_positions"] = positions
    pooling = typed(params, "pooling", str)
    if pooling is not None:
        if pooling not in POOLING_MODES:
            raise InvalidArgument(f"parameter 'pooling' must be one of {', '.join(POOLING_MODES)}, got {pooling!r}")
        out["pooling"] = pooling
    normalize = typed(params, "normalize", bool)
    if normalize is not None:
        out["normalize"] = normalize
    datatype = typed(params, "datatype", str)
    if datatype is not None:
        if datatype not in ("FP32", "FP16"):
            raise InvalidArgument(f"parameter 'datatype' must be FP32 or FP16, got {datatype!r}")
        out["datatype"] = datatype
    return out


def parse_specs(request, available: list[str], defaults: list[str], pooling: dict,
                padded_length: int) -> list[OutputSpec]:
    """One OutputSpec per output to return, from request-level and per-output parameters."""
    request_params = params_to_dict(request.parameters)
    _check_keys(request_params, REQUEST_KEYS, "request parameters")
    base = _settings(request_params, {"pooling": pooling["mode"], "normalize": pooling["normalize"]},
                     padded_length)
    requested = [(o.name, params_to_dict(o.parameters)) for o in request.outputs] or [(n, {}) for n in defaults]
    specs = []
    for name, params in requested:
        if name not in available:
            raise InvalidArgument(f"unknown output '{name}'; this model has {', '.join(available)}")
        if any(spec.name == name for spec in specs):
            raise InvalidArgument(f"output '{name}' is requested twice")
        _check_keys(params, SHAPING_KEYS, f"output '{name}' parameters")
        specs.append(OutputSpec(name=name, **_settings(params, base, padded_length)))
    return specs


def answer_bytes(specs: list[OutputSpec], catalog: dict, batch: int, padded_length: int) -> int:
    """The raw bytes of the outputs `specs` will return, from the output catalog's shapes
    (ModelInfo.outputs: name -> (datatype, shape with -1 for the batch and sequence axes))."""
    total = 0
    for spec in specs:
        datatype, shape = catalog[spec.name]
        dims = [batch, *shape[1:]]
        if len(dims) > 1 and dims[1] == -1:  # the sequence axis
            dims[1] = len(spec.gather_positions) if spec.gather_positions is not None else padded_length
        itemsize = 8 if datatype == "INT64" else 2 if spec.datatype == "FP16" else 4
        if spec.top_k > 0:
            dims[-1] = min(spec.top_k, dims[-1])
            itemsize += 8  # values and int64 indices
        total += math.prod(dims) * itemsize
    return total


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str, normalize: bool) -> torch.Tensor:
    """[B, L, H] + [B, L] mask -> [B, H], as sentence-transformers' Pooling (+ Normalize)."""
    mask_f = mask.to(hidden.device).unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        pooled = hidden[:, 0]
    elif mode == "max":
        pooled = hidden.masked_fill(mask_f == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    else:
        pooled = (hidden * mask_f).sum(dim=1) / mask_f.sum(dim=1).clamp(min=1e-9)
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
    return pooled


def _to_numpy(tensor: torch.Tensor, datatype: str) -> np.ndarray:
    if tensor.is_floating_point():
        tensor = tensor.to(torch.float16 if datatype == "FP16" else torch.float32)
    return tensor.cpu().numpy()


def shape(spec: OutputSpec, tensor: torch.Tensor, mask: torch.Tensor,
          per_token: frozenset = SEQUENCE_OUTPUTS) -> dict[str, np.ndarray]:
    """Apply `spec` to the request's tensor; returns {output name: array} (two names with top_k)."""
    if spec.name == DERIVED:
        tensor = pool(tensor.float(), mask, spec.pooling, spec.normalize)
    elif spec.gather_positions is not None and has_sequence_axis(spec.name, tensor.ndim, per_token):
        tensor = tensor[:, list(spec.gather_positions)]
    if spec.top_k > 0:
        k = min(spec.top_k, tensor.shape[-1])
        values, indices = torch.topk(tensor, k, dim=-1)
        return {f"{spec.name}_topk_values": _to_numpy(values, spec.datatype),
                f"{spec.name}_topk_indices": indices.to(torch.int64).cpu().numpy()}
    return {spec.name: _to_numpy(tensor, spec.datatype)}
