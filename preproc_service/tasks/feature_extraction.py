"""feature-extraction: token vectors (as transformers' FeatureExtractionPipeline) or one pooled vector
per text, pooled on the model side (`sentence_embedding` output) so only [B, hidden] crosses the wire.

postprocess returns (one array per text, prompt token count): [tokens, hidden] for pooling
none, else [hidden].
"""

from __future__ import annotations

import numpy as np

from preproc_service.deployment import Deployment, RequestScope
from preproc_service.tasks.common import require_texts
from preproc_service.tokenization import pad_batch
from splitserve_common.errors import InvalidArgument

POOLINGS = ("none", "mean", "cls", "max")


def sanitize_parameters(dep: Deployment, params: dict) -> dict:
    """Pooling and normalize: request/MLflow values, else the sentence-transformers config, else none."""
    pooling = str(params.get("pooling") or dep.model_dir.pooling or "none").lower()
    if pooling not in POOLINGS:
        raise InvalidArgument(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    normalize = params.get("normalize")
    if normalize is None:
        normalize = dep.model_dir.normalize if pooling != "none" else False
    return {"pooling": pooling, "normalize": bool(normalize)}


async def preprocess(dep: Deployment, inputs: list[str], params: dict) -> dict:
    require_texts(inputs)
    encodings = await dep.tokenization.encode_truncating(inputs, params.get("truncation", True))
    return {"batch": pad_batch(encodings, dep.tokenization.pad_token_id, dep.uses_token_type_ids),
            "lengths": [len(enc.ids) for enc in encodings]}


async def forward(dep: Deployment, scope: RequestScope, model_inputs: dict, params: dict) -> dict:
    datatype = "FP16" if params.get("float16") else "FP32"
    if params["pooling"] == "none":
        return await dep.forward(scope, model_inputs["batch"], ["last_hidden_state"], {"datatype": datatype})
    request = {"pooling": params["pooling"], "normalize": params["normalize"], "datatype": datatype}
    return await dep.forward(scope, model_inputs["batch"], ["sentence_embedding"], request)


def postprocess(dep: Deployment, model_inputs: dict, model_outputs: dict, params: dict) -> tuple[list, int]:
    prompt_tokens = int(model_inputs["batch"]["attention_mask"].sum())
    if params["pooling"] != "none":
        return list(model_outputs["sentence_embedding"]), prompt_tokens
    hidden = model_outputs["last_hidden_state"]
    vectors = [hidden[i, :n] for i, n in enumerate(model_inputs["lengths"])]
    if params["normalize"]:
        vectors = [_l2_normalize(v) for v in vectors]
    return vectors, prompt_tokens


def _l2_normalize(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v.astype(np.float32), axis=-1, keepdims=True)
    return (v / np.maximum(norm, 1e-12)).astype(v.dtype)
