"""The artifacts and requests of the MLflow scoring-protocol tests, shared by the test and by the
script that recorded `mlflow models serve`'s answers (tests/fixtures/mlflow_scoring/record.py).

Every artifact is built by tests/model_factory.py, deterministically, so the recorded answers
hold for the artifacts the tests build again.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests import model_factory as mf
from tests.generation_helpers import BUILDERS

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mlflow_scoring"

T1, T2 = "Alice walked to the river in Paris.", "the old market"
GREEDY = {"max_new_tokens": 8, "do_sample": False}
# The tiny token classifier labels most tokens O; MLflow fails on a text without entities
# (IndexError in its output parser), so every token is kept.
MODEL_CONFIGS = {"token-classification": {"ignore_labels": []}}


INFERENCE_TASKS = {"chat": "llm/v1/chat", "completions": "llm/v1/completions"}


def build(root: Path, case: str) -> Path:
    """The artifact of `case` under root/case, with the signature mlflow.transformers.save_model
    gives that task by default (recorded from MLflow in signatures.json)."""
    root = Path(root)
    if case in mf.ENCODER_TASKS:
        model, tokenizer = mf.build_encoder(case)
        artifact = mf.save_components(root / case, model, tokenizer, case, model_config=MODEL_CONFIGS.get(case))
    else:
        model, tokenizer = BUILDERS["gpt2"]()
        artifact = mf.save_components(root / case, model, tokenizer, "text-generation",
                                      instance_type="TextGenerationPipeline", inference_task=INFERENCE_TASKS.get(case),
                                      model_config=dict(GREEDY))
    signatures = FIXTURES / "signatures.json"
    if signatures.exists():
        doc = yaml.safe_load((artifact / "MLmodel").read_text())
        doc["signature"] = json.loads(signatures.read_text())[signature_key(case)]
        (artifact / "MLmodel").write_text(yaml.safe_dump(doc, sort_keys=True))
    return artifact


def signature_key(case: str) -> str:
    return INFERENCE_TASKS.get(case, case)


def _json(body) -> tuple[str, str]:
    return "application/json", json.dumps(body)


def _text_formats(a: str, b: str, column: str = "text") -> dict:
    """The ways `mlflow models serve` takes a batch of two texts (and one text alone)."""
    return {
        "inputs": _json({"inputs": [a, b]}),
        "inputs_one": _json({"inputs": a}),
        "instances": _json({"instances": [a, b]}),
        "dataframe_split": _json({"dataframe_split": {"columns": [column], "data": [[a], [b]]}}),
        "dataframe_records": _json({"dataframe_records": [{column: a}, {column: b}]}),
        "csv": ("text/csv", f"{column}\n{a}\n{b}\n"),
    }


def requests(case: str) -> dict[str, tuple[str, str]]:
    """name -> (content type, body) of every request sent to the artifact of `case`."""
    if case == "text-classification":
        return {**_text_formats(T1, T2),
                "params_top_k": _json({"inputs": [T1, T2], "params": {"top_k": 2}}),
                "pair_records": _json({"dataframe_records": [{"text": T1, "text_pair": T2}]}),
                "pair_inputs": _json({"inputs": {"text": T1, "text_pair": T2}})}
    if case == "token-classification":
        return {**_text_formats(T1, T2),
                "params_aggregation": _json({"inputs": [T1], "params": {"aggregation_strategy": "simple"}})}
    if case == "fill-mask":
        return {**_text_formats("Alice walked to the [MASK] in Paris.", "the old [MASK]"),
                "params_top_k": _json({"inputs": ["the old [MASK]"], "params": {"top_k": 3}})}
    if case == "feature-extraction":
        return _text_formats(T1, T2)
    if case == "zero-shot-classification":
        labels = ["travel", "music", "food"]
        return {
            "inputs": _json({"inputs": {"sequences": [T1, T2], "candidate_labels": labels}}),
            "inputs_one": _json({"inputs": {"sequences": T1, "candidate_labels": labels,
                                            "hypothesis_template": "This text is about {}."}}),
            "dataframe_records": _json({"dataframe_records": [{"sequences": T1, "candidate_labels": labels}]}),
            "dataframe_split": _json({"dataframe_split": {"columns": ["sequences", "candidate_labels"],
                                                          "data": [[T1, labels]]}}),
        }
    if case == "text-generation":
        return {**_text_formats("the river of", "why", column="prompt"),
                "params_max_new_tokens": _json({"inputs": ["the river of"], "params": {"max_new_tokens": 3}})}
    if case == "chat":
        messages = [{"role": "user", "content": "the river of Paris"}]
        return {"messages": _json({"messages": messages, "max_tokens": 6}),
                "messages_default_length": _json({"messages": messages}),
                "dataframe_records": _json({"dataframe_records": [{"messages": messages, "max_tokens": 6}]})}
    if case == "completions":
        return {"prompt": _json({"prompt": "the river of", "max_tokens": 6}),
                "prompt_default_length": _json({"prompt": "why"}),
                "dataframe_records": _json({"dataframe_records": [{"prompt": "the river of", "max_tokens": 6}]})}
    raise KeyError(case)


CASES = [*mf.ENCODER_TASKS.keys() - {"question-answering"}, "text-generation", "chat", "completions"]
CASES.sort()
PROBES = ["/ping", "/health", "/version"]
