"""Request parameters -> the model's GenerationSettings, with MLflow's precedence.

Every key: the request's value, else the MLmodel signature's param default, else the saved
model_config. Generation knobs still unset are left to model_service, which applies
generation_config.json, then greedy decoding (model_service/generation/sampling.py);
preproc's own keys (return_full_text, include_prompt, collapse_whitespace, stop) fall back
to the pipeline's default. llm/v1's `max_tokens` counts as max_new_tokens.
"""

from __future__ import annotations

from splitserve_common.errors import InvalidArgument
from splitserve_pb import generation_pb2

GENERATION_KEYS = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                   "repetition_penalty", "seed", "presence_penalty", "frequency_penalty", "num_beams",
                   "num_return_sequences", "length_penalty", "no_repeat_ngram_size", "early_stopping")
PREPROC_DEFAULTS = {"return_full_text": True, "include_prompt": None, "collapse_whitespace": False, "stop": []}


class GenerationParams:
    """What one request asked for, after precedence. `applied` lists every value that was set."""

    def __init__(self, explicit: dict, model_config: dict, signature_params: dict):
        self.applied: dict = {}
        self.settings = generation_pb2.GenerationSettings()
        for key in GENERATION_KEYS:
            value = explicit.get(key)
            for layer in (signature_params, model_config):
                if value is None:
                    value = layer.get(key)
                if value is None and key == "max_new_tokens":
                    value = layer.get("max_tokens")
            if value is not None:
                setattr(self.settings, key, _typed(key, value))
                self.applied[key] = value
        self.options = {}
        for key, default in PREPROC_DEFAULTS.items():
            value = explicit.get(key)
            for layer in (signature_params, model_config):
                if value is None:
                    value = layer.get(key)
            self.options[key] = default if value is None else value
            if value is not None:
                self.applied[key] = value
        if isinstance(self.options["stop"], str):
            self.options["stop"] = [self.options["stop"]]
        if explicit.get("logprobs"):
            self.settings.logprobs = True
            self.settings.top_logprobs = int(explicit.get("top_logprobs") or 0)

    def __getitem__(self, key):
        return self.options[key]


def _typed(key: str, value):
    try:
        if key == "do_sample":
            return bool(value)
        if key == "early_stopping":  # transformers' third value, "never", is not supported
            if not isinstance(value, bool):
                raise ValueError
            return value
        if key in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                   "length_penalty"):
            return float(value)
        return int(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"parameter '{key}' has a value of the wrong type: {value!r}") from None


def explicit_values(message, names) -> dict:
    """The fields of `message` the caller set (proto3 optional presence; repeated: non-empty)."""
    values = {}
    for name in names:
        field = message.DESCRIPTOR.fields_by_name.get(name)
        if field is None:
            continue
        if field.is_repeated:
            if len(getattr(message, name)):
                values[name] = list(getattr(message, name))
        elif message.HasField(name):
            values[name] = getattr(message, name)
    return values
