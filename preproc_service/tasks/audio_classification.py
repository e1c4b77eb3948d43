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
from preproc_service.deployment import Deployment, RequestScope, all_or_nothing
from preproc_service.tasks.common import check_top_k, require_texts
from preproc_service.tasks.text_classification import FUNCTIONS, label_scores
from splitserve_common.errors import FailedPrecondition, InvalidArgument

# The stage preprocess is timed as (decoding and feature extraction; text tasks' is "tokenize").
PREPROCESS_STAGE = "features"


def sanitize_parameters(dep: Deployment, params: dict) -> dict:
    """The pipeline's _sanitize_parameters: top_k checked, function_to_apply checked or chosen for the model."""
    problem_type = dep.require_info().problem_type
    check_top_k(params.get("top_k"))
    function = params.get("function_to_apply")
    if function is not None and function not in FUNCTIONS:
        raise InvalidArgument(f"function_to_apply must be one of {', '.join(FUNCTIONS)}, got {function!r}")
    if function is None:
        function = {"regression": "none", "multi_label_classification": "sigmoid"}.get(problem_type or "", "softmax")
    return {"function_to_apply": function}


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


async def preprocess(dep: Deployment, inputs: list[audio.AudioInput], params: dict) -> dict:
    """{"clips": the feature extractor's arrays per clip}."""
    return {"clips": [features(dep.feature_extractor, clip) for clip in await load_audio(dep, inputs)]}


async def forward(dep: Deployment, scope: RequestScope, model_inputs: dict, params: dict) -> dict:
    """One model request per clip (clips differ in length); model_service batches equal lengths."""
    answers = await all_or_nothing(dep.forward(scope, one, ["logits"]) for one in model_inputs["clips"])
    return {"logits": np.stack([answer["logits"][0] for answer in answers])}


def postprocess(dep: Deployment, model_inputs: dict, model_outputs: dict, params: dict) -> list[list[dict]]:
    """The `top_k` best labels per clip (unset: every label), scored by function_to_apply."""
    top_k = params.get("top_k")
    return label_scores(model_outputs["logits"], dep.require_info().id2label, params["function_to_apply"], top_k,
                        all_labels=top_k is None)
