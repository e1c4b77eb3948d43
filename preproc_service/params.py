"""Which parameter values apply to a request, with MLflow's precedence (highest first):

    per-request > MLmodel signature param defaults > saved model_config > the pipeline's own defaults

(shared/reference/mlflow-layout.md). Unlike MLflow, per-request values are accepted even when the
signature declares no params; every answer lists what it applied in ResponseMeta.applied_parameters.
"""

from __future__ import annotations

import json

# The pipeline's own defaults for each task's options (None: decided from the model at run time).
PIPELINE_DEFAULTS: dict[str, dict] = {
    "text-classification": {"function_to_apply": None, "top_k": None, "truncation": True},
    "token-classification": {"aggregation_strategy": "none", "ignore_labels": ["O"], "truncation": True},
    "fill-mask": {"top_k": 5, "targets": None, "truncation": True},
    # transformers 4.x QuestionAnsweringPipeline defaults (preprocess/postprocess signatures).
    "question-answering": {"top_k": 1, "doc_stride": None, "max_answer_len": 15, "max_seq_len": None,
                           "max_question_len": 64, "handle_impossible_answer": False, "align_to_words": True},
    "zero-shot-classification": {"candidate_labels": None, "hypothesis_template": "This example is {}.",
                                 "multi_label": False},
    "feature-extraction": {"pooling": None, "normalize": None, "float16": False, "truncation": True},
    "audio-classification": {"top_k": None, "function_to_apply": None},
    "automatic-speech-recognition": {"chunk_length_s": 0, "stride_length_s": None, "return_timestamps": None},
    "table-question-answering": {"sequential": False, "truncation": "drop_rows_to_fit"},
}


class ParameterResolver:
    def __init__(self, model_config: dict | None = None, signature_params: dict | None = None):
        self.model_config = dict(model_config or {})
        self.signature_params = dict(signature_params or {})

    def defaults(self, task: str) -> dict:
        """Task options before any per-request value: pipeline < model_config < signature defaults."""
        applied = dict(PIPELINE_DEFAULTS.get(task, {}))
        for layer in (self.model_config, self.signature_params):
            for key, value in layer.items():
                if key in applied and value is not None:
                    applied[key] = value
        return applied

    def resolve(self, task: str, request_values: dict) -> dict:
        """Final values: `request_values` holds only what the request set explicitly."""
        applied = self.defaults(task)
        applied.update({key: value for key, value in request_values.items() if value is not None})
        return applied


def as_json(values: dict) -> dict[str, str]:
    """name -> JSON text, for ResponseMeta.applied_parameters / InfoResponse.default_parameters."""
    return {key: json.dumps(value) for key, value in values.items()}


def explicit_fields(message, names) -> dict:
    """The proto3 `optional` fields of `message` that the caller set."""
    return {name: getattr(message, name) for name in names if message.HasField(name)}
