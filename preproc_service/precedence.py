"""Which parameter values apply to a request: MLflow's precedence, the one implementation.

Highest first (docs/preproc_service.md, "Parameters"):

    per-request > MLmodel signature param defaults > saved model_config > the pipeline's own defaults

The pipeline's defaults come from the task registry (splitserve_common/tasks.py); anything not
known there is left to the model service (generation_config.json, then greedy decoding).
Unlike MLflow, per-request values are accepted even when the signature declares no params;
every answer lists what it applied (ResponseMeta.applied_parameters).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field


@dataclass
class Resolved:
    """Values after precedence; `chosen` names the keys a request or the model directory set."""
    values: dict
    chosen: set[str] = field(default_factory=set)

    def set_values(self) -> dict:
        """Only the values someone chose (defaults left out)."""
        return {key: self.values[key] for key in self.values if key in self.chosen}


class Precedence:
    def __init__(self, model_config: dict | None = None, signature_params: dict | None = None):
        self.model_config = dict(model_config or {})
        self.signature_params = dict(signature_params or {})

    def resolve(self, defaults, request_values: dict | None = None,
                fallbacks: dict[str, tuple[str, ...]] | None = None) -> Resolved:
        """Every key of `defaults`, plus every key the request set (`request_values` holds only those).

        `fallbacks`: key -> other names read for it in the same layer (llm/v1's `max_tokens` for
        `max_new_tokens`), tried after the key itself and before the next layer down.
        """
        request_values = request_values or {}
        resolved = Resolved(copy.deepcopy(dict(defaults)))  # callers may change list values
        for key in {**dict(defaults), **request_values}:
            names = (key, *(fallbacks or {}).get(key, ()))
            value = request_values.get(key)
            for layer in (self.signature_params, self.model_config):
                for name in names:
                    if value is None:
                        value = layer.get(name)
            if value is not None:
                resolved.values[key] = value
                resolved.chosen.add(key)
        return resolved


def as_json(values: dict) -> dict[str, str]:
    """name -> JSON text, for ResponseMeta.applied_parameters / InfoResponse.default_parameters."""
    return {key: json.dumps(value) for key, value in values.items()}


def explicit_fields(message, names) -> dict:
    """The fields of `message` the caller set: proto3 `optional` presence; repeated fields when non-empty."""
    values = {}
    for name in names:
        field_descriptor = message.DESCRIPTOR.fields_by_name[name]
        if field_descriptor.is_repeated:
            if len(getattr(message, name)):
                values[name] = list(getattr(message, name))
        elif message.HasField(name):
            values[name] = getattr(message, name)
    return values
