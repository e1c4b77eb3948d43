"""feature-extraction: token vectors (as transformers' FeatureExtractionPipeline) or one pooled vector
per text, pooled on the model side (`sentence_embedding` output) so only [B, hidden] crosses the wire.

postprocess returns (one array per text, prompt token count): [tokens, hidden] for pooling
none, else [hidden].
"""

from __future__ import annotations

import numpy as np

from preproc_service.deployment import Deployment, RequestScope
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
    dep.limits.check_inputs(inputs)
    encodings = await dep.tokenization.encode_truncating(inputs, params.get("truncation", True))
    return {"batch": dep.pad(encodings), "lengths": [len(enc.ids) for enc in encodings]}


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


def check_dimensions(dep: Deployment, dimensions: int) -> None:
    """OpenAI's `dimensions`: the full size always; fewer only for a model trained for it (Matryoshka:
    config.json `matryoshka_dimensions` lists the sizes, or `is_matryoshka` allows any)."""
    config = dep.model_dir.config or {}
    full = config.get("hidden_size") or config.get("d_model") or config.get("n_embd")
    if dimensions < 1 or (full and dimensions > full):
        raise InvalidArgument(f"dimensions={dimensions}: must be in [1, {full or 'the model size'}]")
    if dimensions == full:
        return
    listed = config.get("matryoshka_dimensions")
    if listed and dimensions in listed or (not listed and config.get("is_matryoshka")):
        return
    declared = f"matryoshka_dimensions {listed}" if listed else "no matryoshka_dimensions"
    raise InvalidArgument(f"dimensions={dimensions}: this model was not trained for shortened embeddings (its "
                          f"config.json declares {declared}); ask for its full size {full} or leave dimensions out")


def shorten(vectors: list[np.ndarray], dimensions: int, normalized: bool) -> list[np.ndarray]:
    """The first `dimensions` values of each vector, normalized again when the full ones were."""
    short = [v[..., :dimensions] for v in vectors]
    return [_l2_normalize(v) for v in short] if normalized else short
