"""A generation request's parameters -> the model's GenerationSettings plus preproc's text options.

Precedence is preproc_service/precedence.py's (MLflow's); llm/v1's `max_tokens` counts as
max_new_tokens in every layer. Generation knobs nobody set are left to model_service, which
applies generation_config.json, then greedy decoding (model_service/generation/sampling.py);
preproc's own keys (return_full_text, include_prompt, collapse_whitespace, stop) fall back to
the task's pipeline defaults (splitserve_common/tasks.py).
"""

from __future__ import annotations

import math

from preproc_service.precedence import Precedence
from splitserve_common import tasks
from splitserve_common.errors import InvalidArgument
from splitserve_pb import generation_pb2

GENERATION_KEYS = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                   "repetition_penalty", "seed", "presence_penalty", "frequency_penalty", "num_beams",
                   "num_return_sequences", "length_penalty", "no_repeat_ngram_size", "early_stopping")
_FALLBACKS = {"max_new_tokens": ("max_tokens",)}


class GenerationParams:
    """What one request asked for, after precedence. `applied` lists every value that was set."""

    def __init__(self, precedence: Precedence, task: str, explicit: dict):
        task_spec = tasks.spec(task) or tasks.TASKS["text-generation"]
        defaults = {**dict.fromkeys(GENERATION_KEYS), **task_spec.pipeline_defaults}
        resolved = precedence.resolve(defaults, {k: v for k, v in explicit.items() if k in defaults}, _FALLBACKS)
        self.applied = resolved.set_values()
        self.options = {key: resolved.values[key] for key in task_spec.pipeline_defaults}
        self.settings = generation_pb2.GenerationSettings()
        for key in GENERATION_KEYS:
            if key in self.applied:
                setattr(self.settings, key, typed_setting(key, self.applied[key]))
        if isinstance(self.options["stop"], str):
            self.options["stop"] = [self.options["stop"]]
        if explicit.get("logprobs"):
            self.settings.logprobs = True
            self.settings.top_logprobs = int(explicit.get("top_logprobs") or 0)

    def __getitem__(self, key):
        return self.options[key]


def typed_setting(key: str, value):
    try:
        if key == "do_sample":
            return bool(value)
        if key == "early_stopping":  # transformers' third value, "never", is not supported
            if not isinstance(value, bool):
                raise ValueError
            return value
        if key in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                   "length_penalty"):
            number = float(value)
            if not math.isfinite(number):
                raise InvalidArgument(f"parameter '{key}' must be a finite number, got {value!r}")
            return number
        return int(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"parameter '{key}' has a value of the wrong type: {value!r}") from None
