"""fill-mask: transformers' FillMaskPipeline preprocess/postprocess, numpy only.

Only the logits at mask positions cross the wire (model-side `gather_positions`, one model
request per text since positions differ). Model-side `top_k` is not used: the scores are
softmax probabilities over the whole vocabulary, which need every logit of the row.
"""

from __future__ import annotations

import asyncio

import numpy as np

from preproc_service.deployment import Call, Deployment
from preproc_service.tasks.common import check_top_k, require_texts, softmax
from preproc_service.tokenization import pad_batch
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


def postprocess(tokenizer, input_ids: np.ndarray, mask_positions: np.ndarray, logits: np.ndarray, top_k: int,
                target_ids: np.ndarray | None) -> list[list[dict]]:
    """Candidates per mask; `logits` is [masks, vocab] for the mask positions."""
    if target_ids is not None and len(target_ids) < top_k:
        top_k = len(target_ids)
    probs = softmax(logits.astype(np.float32))
    if target_ids is not None:
        probs = probs[..., target_ids]
    single_mask = len(mask_positions) == 1
    result = []
    for i, row in enumerate(probs):
        order = np.argsort(-row, kind="stable")[:top_k]
        candidates = []
        for p in order:
            token = int(target_ids[p]) if target_ids is not None else int(p)
            tokens = input_ids.copy()
            tokens[mask_positions[i]] = token
            tokens = tokens[tokens != tokenizer.pad_token_id]
            candidates.append({
                "score": float(row[p]),
                "token": token,
                "token_str": tokenizer.decode([token]),
                # The pipeline keeps special tokens in the sequence when there are several masks.
                "sequence": tokenizer.decode(tokens.tolist(), skip_special_tokens=single_mask),
            })
        result.append(candidates)
    return result


async def run(dep: Deployment, call: Call, texts: list[str], params: dict) -> list[list[list[dict]]]:
    check_top_k(params.get("top_k"))
    require_texts(texts)
    tokenizer = dep.tokenizer
    if tokenizer.mask_token_id is None:
        raise FailedPrecondition("the tokenizer does not define a mask token")
    targets = params.get("targets") or None
    target_ids = get_target_ids(tokenizer, targets) if targets else None
    with call.stage("tokenize"):
        encodings = await dep.tokenization.encode_truncating(texts, params.get("truncation", True))
    masks = []
    for i, enc in enumerate(encodings):
        positions = np.nonzero(np.array(enc.ids) == tokenizer.mask_token_id)[0]
        if len(positions) == 0:
            raise InvalidArgument(f"input {i}: no mask token ({tokenizer.mask_token}) found in {texts[i]!r}")
        masks.append(positions)

    async def forward_one(enc, positions):
        inputs = pad_batch([enc], dep.tokenization.pad_token_id, dep.uses_token_type_ids)
        gather = ",".join(str(int(p)) for p in positions)
        return (await dep.forward(call, inputs, ["logits"], {"gather_positions": gather}))["logits"][0]

    logits = await asyncio.gather(*(forward_one(enc, pos) for enc, pos in zip(encodings, masks, strict=True)))
    with call.stage("postprocess"):
        return [postprocess(tokenizer, np.array(enc.ids), pos, lg, int(params["top_k"]), target_ids)
                for enc, pos, lg in zip(encodings, masks, logits, strict=True)]
