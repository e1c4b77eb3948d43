"""text-classification: transformers' TextClassificationPipeline preprocess/postprocess, numpy only."""

from __future__ import annotations

import numpy as np

from preproc_service.deployment import Deployment, RequestScope
from preproc_service.tasks.common import sigmoid, softmax
from splitserve_common.errors import InvalidArgument

FUNCTIONS = ("softmax", "sigmoid", "none")


def default_function(problem_type: str | None, num_labels: int) -> str:
    """The pipeline's choice when function_to_apply is not given."""
    if problem_type == "regression":
        return "none"
    if problem_type == "multi_label_classification" or num_labels == 1:
        return "sigmoid"
    if problem_type == "single_label_classification" or num_labels > 1:
        return "softmax"
    return "none"


def pair_inputs(texts: list[str], text_pairs: list[str]) -> list:
    """The inputs of one request: texts, or (text, text_pair) tuples when pairs are given."""
    if text_pairs and len(text_pairs) != len(texts):
        raise InvalidArgument(f"text_pairs has {len(text_pairs)} entries but texts has {len(texts)}")
    return list(zip(texts, text_pairs, strict=True)) if text_pairs else list(texts)


def every_label(explicit: dict, params: dict) -> None:
    """all_labels is the pipeline's explicit top_k=None: every label, sorted. Beside a top_k of the
    same request it is refused; a top_k from the saved defaults gives way to it."""
    if not params.get("all_labels"):
        params.pop("all_labels", None)  # all_labels=false asks for nothing beyond top_k
        return
    if "top_k" in explicit:
        raise InvalidArgument(f"top_k={explicit['top_k']} and all_labels both given: all_labels asks for every "
                              "label; send one of them")
    params["top_k"] = None


def sanitize_parameters(dep: Deployment, params: dict) -> dict:
    function = params.get("function_to_apply")
    if function is not None and str(function).lower() not in FUNCTIONS:
        raise InvalidArgument(f"function_to_apply must be one of {', '.join(FUNCTIONS)}, got {function!r}")
    top_k = params.get("top_k")
    if top_k is not None and top_k <= 0:
        raise InvalidArgument(f"top_k must be >= 1 (all_labels asks for every label), got {top_k}")
    info = dep.require_info()
    function = str(function).lower() if function else default_function(info.problem_type, info.num_labels)
    return {"function_to_apply": function}


async def preprocess(dep: Deployment, inputs: list, params: dict) -> dict:
    dep.limits.check_inputs(inputs)
    encodings = await dep.tokenization.encode_truncating(inputs, params.get("truncation", True))
    return {"batch": dep.pad(encodings)}


async def forward(dep: Deployment, scope: RequestScope, model_inputs: dict, params: dict) -> dict:
    return await dep.forward(scope, model_inputs["batch"], ["logits"])


def postprocess(dep: Deployment, model_inputs: dict, model_outputs: dict, params: dict) -> list:
    return label_scores(model_outputs["logits"], dep.require_info().id2label, params["function_to_apply"],
                        params.get("top_k"), bool(params.get("all_labels")))


def label_scores(logits: np.ndarray, id2label: dict[int, str], function_to_apply: str, top_k: int | None,
                 all_labels: bool = False) -> list:
    """One list of {label, score} per row, best first: top_k of them, the best only when top_k is
    None, every label with all_labels."""
    logits = logits.astype(np.float32)
    if function_to_apply == "sigmoid":
        scores = sigmoid(logits)
    elif function_to_apply == "softmax":
        scores = softmax(logits)
    else:
        scores = logits
    results = []
    for row in scores:
        order = np.argsort(-row, kind="stable")[: None if all_labels else (top_k or 1)]
        results.append([{"label": id2label.get(int(i), f"LABEL_{int(i)}"), "score": float(row[i])} for i in order])
    return results
