"""text-classification: transformers' TextClassificationPipeline preprocess/postprocess, numpy only."""

from __future__ import annotations

import numpy as np

from preproc_service.deployment import Call, Deployment
from preproc_service.tasks.common import require_texts, softmax
from preproc_service.tokenization import pad_batch
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


def check_params(params: dict) -> None:
    function = params.get("function_to_apply")
    if function is not None and str(function).lower() not in FUNCTIONS:
        raise InvalidArgument(f"function_to_apply must be one of {', '.join(FUNCTIONS)}, got {function!r}")
    top_k = params.get("top_k")
    if top_k is not None and top_k <= 0:
        raise InvalidArgument(f"top_k must be >= 1, got {top_k}")


async def preprocess(dep: Deployment, call: Call, texts: list[str], text_pairs: list[str], truncation: bool):
    require_texts(texts)
    if text_pairs and len(text_pairs) != len(texts):
        raise InvalidArgument(f"text_pairs has {len(text_pairs)} entries but texts has {len(texts)}")
    items = list(zip(texts, text_pairs, strict=True)) if text_pairs else list(texts)
    with call.stage("tokenize"):
        encodings = await dep.tokenization.encode_truncating(items, truncation)
    return pad_batch(encodings, dep.tokenization.pad_token_id, dep.uses_token_type_ids)


def postprocess(logits: np.ndarray, id2label: dict[int, str], function_to_apply: str, top_k: int | None) -> list:
    """One list of {label, score} per row, best first; top_k None: best label only."""
    logits = logits.astype(np.float32)
    if function_to_apply == "sigmoid":
        scores = 1.0 / (1.0 + np.exp(-logits))
    elif function_to_apply == "softmax":
        scores = softmax(logits)
    else:
        scores = logits
    results = []
    for row in scores:
        order = np.argsort(-row, kind="stable")[: (top_k or 1)]
        results.append([{"label": id2label.get(int(i), f"LABEL_{int(i)}"), "score": float(row[i])} for i in order])
    return results


async def run(dep: Deployment, call: Call, texts: list[str], text_pairs: list[str], params: dict) -> list:
    check_params(params)
    info = dep.require_info()
    inputs = await preprocess(dep, call, texts, text_pairs, params.get("truncation", True))
    outputs = await dep.forward(call, inputs, ["logits"])
    function = params.get("function_to_apply")
    function = str(function).lower() if function else default_function(info.problem_type, info.num_labels)
    params["function_to_apply"] = function
    with call.stage("postprocess"):
        return postprocess(outputs["logits"], info.id2label, function, params.get("top_k"))
