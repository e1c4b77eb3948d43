"""audio-classification: transformers' AudioClassificationPipeline preprocess/postprocess, numpy only.

preprocess: audio -> mono float32 at the feature extractor's rate (preproc_service.audio) ->
the feature extractor's arrays (its own attention-mask default, as the pipeline calls it);
forward: model_service returns `logits` [1, labels] per clip (equal-length clips share a batch);
postprocess: softmax / sigmoid / none, then the `top_k` best labels.

`top_k`: the pipeline sets 5 at construction, but every call without `top_k` passes
`top_k=None` to `_sanitize_parameters`, which means every label; so unset is every label, and a
value above the number of labels is cut to it.
"""

from __future__ import annotations

import asyncio

import numpy as np

from preproc_service import audio
from preproc_service.deployment import Deployment, RequestScope
from preproc_service.tasks.common import check_top_k, require_texts, softmax
from splitserve_common.errors import FailedPrecondition, InvalidArgument

FUNCTIONS = ("softmax", "sigmoid", "none")


def sanitize_parameters(params: dict, problem_type: str | None, num_labels: int) -> dict:
    """Checked postprocess parameters, the way the pipeline's _sanitize_parameters/postprocess choose them."""
    check_top_k(params.get("top_k"))
    top_k = params.get("top_k")
    function = params.get("function_to_apply")
    if function is not None and function not in FUNCTIONS:
        raise InvalidArgument(f"function_to_apply must be one of {', '.join(FUNCTIONS)}, got {function!r}")
    if function is None:
        function = {"regression": "none", "multi_label_classification": "sigmoid"}.get(problem_type or "", "softmax")
    params["function_to_apply"] = function
    return {"top_k": num_labels if top_k is None else min(top_k, num_labels), "function_to_apply": function}


def require_feature_extractor(dep: Deployment):
    if dep.feature_extractor is None:
        raise FailedPrecondition("this model directory has no feature extractor (components/feature_extractor/ "
                                 "or processor/): audio cannot be turned into model inputs")
    return dep.feature_extractor


async def load_audio(dep: Deployment, items: list[audio.AudioInput]) -> list[np.ndarray]:
    """Every item decoded / resampled to the feature extractor's rate, off the event loop."""
    require_texts(items, "audio")
    if len(items) > dep.audio.max_inputs:
        raise InvalidArgument(f"{len(items)} clips in the request, more than the limit of {dep.audio.max_inputs} "
                              "(--max-audio-inputs)")
    rate = require_feature_extractor(dep).sampling_rate
    return await asyncio.gather(*(asyncio.to_thread(audio.load, item, rate, dep.audio, i)
                                  for i, item in enumerate(items)))


def features(feature_extractor, samples: np.ndarray, **kwargs) -> dict[str, np.ndarray]:
    """The feature extractor's numpy arrays for one clip (attention_mask as INT64)."""
    processed = feature_extractor(samples, sampling_rate=feature_extractor.sampling_rate, return_tensors="np",
                                  **kwargs)
    return {name: np.asarray(value, dtype=np.int64 if name == "attention_mask" else np.float32)
            for name, value in processed.items()}


async def preprocess(dep: Deployment, scope: RequestScope,
                     items: list[audio.AudioInput]) -> list[dict[str, np.ndarray]]:
    with scope.stage("decode"):
        clips = await load_audio(dep, items)
    with scope.stage("features"):
        return [features(dep.feature_extractor, clip) for clip in clips]


async def forward(dep: Deployment, scope: RequestScope, inputs: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """One model request per clip (clips differ in length); model_service batches equal lengths."""
    answers = await asyncio.gather(*(dep.forward(scope, one, ["logits"]) for one in inputs))
    return [answer["logits"][0] for answer in answers]


def postprocess(logits: np.ndarray, id2label: dict[int, str], top_k: int, function_to_apply: str) -> list[dict]:
    logits = logits.astype(np.float32)
    if function_to_apply == "softmax":
        probs = softmax(logits)
    elif function_to_apply == "sigmoid":
        probs = 1.0 / (1.0 + np.exp(-logits))
    else:
        probs = logits
    order = np.argsort(-probs, kind="stable")[:top_k]
    return [{"score": float(probs[i]), "label": id2label.get(int(i), f"LABEL_{int(i)}")} for i in order]


async def run(dep: Deployment, scope: RequestScope, items: list[audio.AudioInput], params: dict) -> list[list[dict]]:
    info = dep.require_info()
    post = sanitize_parameters(params, info.problem_type, info.num_labels)
    inputs = await preprocess(dep, scope, items)
    logits = await forward(dep, scope, inputs)
    with scope.stage("postprocess"):
        return [postprocess(row, info.id2label, **post) for row in logits]
