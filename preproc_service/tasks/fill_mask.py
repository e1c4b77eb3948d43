"""fill-mask: transformers' FillMaskPipeline preprocess/postprocess, numpy only.

Only the logits at mask positions cross the wire (model-side `gather_positions`, one model
request per text since positions differ). Model-side `top_k` is not used: the scores are
softmax probabilities over the whole vocabulary, which need every logit of the row.
"""

from __future__ import annotations

import numpy as np

from preproc_service.deployment import Deployment, RequestScope, all_or_nothing
from preproc_service.tasks.common import check_top_k, softmax
from splitserve_common.errors import FailedPrecondition, InvalidArgument


def get_target_ids(tokenizer, targets: list[str]) -> np.ndarray:
    """As the pipeline: a target outside the vocabulary becomes its first token."""
    vocab = tokenizer.get_vocab()
    ids = []
    for target in targets:
        token_id = vocab.get(target)
        if token_id is None:
            pieces = tokenizer(target, add_special_tokens=False, return_attention_mask=False,
                               return_token_type_ids=False, max_length=1, truncation=True)["input_ids"]
            if not pieces:
                continue
            token_id = pieces[0]
        ids.append(token_id)
    ids = sorted(set(ids))
    if not ids:
        raise InvalidArgument(f"none of the targets {targets!r} maps to a token of the vocabulary")
    return np.array(ids)


def sanitize_parameters(dep: Deployment, params: dict) -> dict:
    check_top_k(params.get("top_k"))
    if dep.tokenizer.mask_token_id is None:
        raise FailedPrecondition("the tokenizer does not define a mask token")
    targets = params.get("targets") or None
    return {"top_k": int(params["top_k"]), "target_ids": get_target_ids(dep.tokenizer, targets) if targets else None}


async def preprocess(dep: Deployment, inputs: list[str], params: dict) -> dict:
    dep.limits.check_inputs(inputs)
    encodings = await dep.tokenization.encode_truncating(inputs, params.get("truncation", True))
    mask_id = dep.tokenizer.mask_token_id
    masks = []
    for i, enc in enumerate(encodings):
        positions = np.nonzero(np.array(enc.ids) == mask_id)[0]
        if len(positions) == 0:
            raise InvalidArgument(f"input {i}: no mask token ({dep.tokenizer.mask_token}) found in {inputs[i]!r}")
        masks.append(positions)
    return {"encodings": encodings, "masks": masks}


async def forward(dep: Deployment, scope: RequestScope, model_inputs: dict, params: dict) -> dict:
    """Logits at the mask positions, [masks, vocab] per text: one model request per text."""
    async def forward_one(enc, positions):
        batch = dep.pad([enc])
        gather = ",".join(str(int(p)) for p in positions)
        return (await dep.forward(scope, batch, ["logits"], {"gather_positions": gather}))["logits"][0]

    pairs = zip(model_inputs["encodings"], model_inputs["masks"], strict=True)
    return {"logits": await all_or_nothing(forward_one(enc, positions) for enc, positions in pairs)}


def postprocess(dep: Deployment, model_inputs: dict, model_outputs: dict, params: dict) -> list[list[list[dict]]]:
    rows = zip(model_inputs["encodings"], model_inputs["masks"], model_outputs["logits"], strict=True)
    return [candidates(dep.tokenizer, np.array(enc.ids), positions, logits, params["top_k"], params["target_ids"])
            for enc, positions, logits in rows]


def candidates(tokenizer, input_ids: np.ndarray, mask_positions: np.ndarray, logits: np.ndarray, top_k: int,
               target_ids: np.ndarray | None) -> list[list[dict]]:
    """Candidates per mask of one text; `logits` is [masks, vocab] for the mask positions."""
    if target_ids is not None and len(target_ids) < top_k:
        top_k = len(target_ids)
    probs = softmax(logits.astype(np.float32))
    if target_ids is not None:
        probs = probs[..., target_ids]
    single_mask = len(mask_positions) == 1
    result = []
    for i, row in enumerate(probs):
        order = np.argsort(-row, kind="stable")[:top_k]
        per_mask = []
        for p in order:
            token = int(target_ids[p]) if target_ids is not None else int(p)
            tokens = input_ids.copy()
            tokens[mask_positions[i]] = token
            tokens = tokens[tokens != tokenizer.pad_token_id]
            per_mask.append({
                "score": float(row[p]),
                "token": token,
                "token_str": tokenizer.decode([token]),
                # The pipeline keeps special tokens in the sequence when there are several masks.
                "sequence": tokenizer.decode(tokens.tolist(), skip_special_tokens=single_mask),
            })
        result.append(per_mask)
    return result
