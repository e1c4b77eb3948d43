"""question-answering, following transformers 4.x QuestionAnsweringPipeline (removed in transformers 5).

Where each rule comes from (transformers 4.57 `pipelines/question_answering.py`):
- preprocess (fast-tokenizer branch): question first when padding_side is "right", truncation
  "only_second" at max_seq_len (default min(model_max_length, 384)) with overflow windows that
  overlap by doc_stride (default min(max_seq_len // 2, 128)); p_mask is 1 outside the context,
  except on the CLS token. max_question_len only applies to slow tokenizers there, so it is
  accepted and has no effect here either.
- select_starts_ends: mask undesired tokens with -10000, softmax start and end per window,
  null score start[0]*end[0] (min over windows), then CLS masked out.
- decode_spans: outer product of start/end probabilities, keep end >= start and length
  <= max_answer_len, top candidates, drop spans touching undesired tokens.
- postprocess (best_answers here): pre_topk = top_k * 2 + 10 when align_to_words; spans map to characters through the
  encoding's words (get_indices), equal answers (case-insensitive) across windows add their scores,
  the null answer joins when handle_impossible_answer, sort by score, keep top_k.
"""

from __future__ import annotations

import numpy as np

from preproc_service.deployment import Deployment, RequestScope
from preproc_service.tasks.common import check_top_k
from preproc_service.tokenization import EncodeOptions
from splitserve_common.errors import InvalidArgument


def sanitize_parameters(dep: Deployment, params: dict) -> dict:
    check_top_k(params.get("top_k"))
    if params.get("max_answer_len") is not None and params["max_answer_len"] < 1:
        raise InvalidArgument(f"max_answer_len must be >= 1, got {params['max_answer_len']}")
    for key in ("doc_stride", "max_seq_len"):
        if params.get(key) is not None and params[key] < 0:
            raise InvalidArgument(f"{key} must be >= 0, got {params[key]}")
    max_seq_len = params.get("max_seq_len") or min(dep.max_length, 384)
    doc_stride = params.get("doc_stride")
    if doc_stride is None:
        doc_stride = min(max_seq_len // 2, 128)
    if doc_stride > max_seq_len:
        raise InvalidArgument(f"doc_stride ({doc_stride}) is larger than max_seq_len ({max_seq_len})")
    return {"max_seq_len": max_seq_len, "doc_stride": doc_stride}


async def preprocess(dep: Deployment, inputs: list[tuple[str, str]], params: dict) -> dict:
    """Each (question, context) becomes its windows; the batch holds every window of every input."""
    dep.limits.check_inputs(inputs, "inputs")
    for i, (question, context) in enumerate(inputs):
        if not question:
            raise InvalidArgument(f"input {i}: question is missing or empty")
        if not context:
            raise InvalidArgument(f"input {i}: context is missing or empty")
    question_first = dep.tokenizer.padding_side == "right"
    pairs = [(q, c) if question_first else (c, q) for q, c in inputs]
    options = EncodeOptions(max_length=params["max_seq_len"], stride=params["doc_stride"],
                            strategy="only_second" if question_first else "only_first")
    groups = await dep.tokenization.encode(pairs, options, overflow=True)
    windows = [enc for group in groups for enc in group]
    dep.limits.check_qa_windows(len(windows))
    return {"batch": dep.pad(windows), "contexts": [context for _, context in inputs], "groups": groups,
            "question_first": question_first}


async def forward(dep: Deployment, scope: RequestScope, model_inputs: dict, params: dict) -> dict:
    return await dep.forward(scope, model_inputs["batch"], ["start_logits", "end_logits"])


def postprocess(dep: Deployment, model_inputs: dict, model_outputs: dict, params: dict) -> list[list[dict]]:
    question_first, attention = model_inputs["question_first"], model_inputs["batch"]["attention_mask"]
    cls_id = dep.tokenizer.cls_token_id
    results, row = [], 0
    for context, group in zip(model_inputs["contexts"], model_inputs["groups"], strict=True):
        rows = [(row + k, len(enc.ids)) for k, enc in enumerate(group)]
        results.append(best_answers(
            context, group,
            [model_outputs["start_logits"][r, :n] for r, n in rows],
            [model_outputs["end_logits"][r, :n] for r, n in rows],
            [attention[r, :n] for r, n in rows],
            [p_mask_of(enc, question_first, cls_id) for enc in group],
            question_first, params))
        row += len(group)
    return results


def p_mask_of(encoding, question_first: bool, cls_token_id: int | None) -> np.ndarray:
    """1 for tokens that cannot be in the answer (question, specials), 0 for context and CLS."""
    if question_first:
        p_mask = np.array([seq_id != 1 for seq_id in encoding.sequence_ids], dtype=np.int64)
    else:
        p_mask = np.zeros(len(encoding.ids), dtype=np.int64)
    if cls_token_id is not None:
        p_mask[np.array(encoding.ids) == cls_token_id] = 0
    return p_mask


def decode_spans(start: np.ndarray, end: np.ndarray, topk: int, max_answer_len: int,
                 undesired_tokens: np.ndarray):
    if start.ndim == 1:
        start = start[None]
    if end.ndim == 1:
        end = end[None]
    outer = np.matmul(np.expand_dims(start, -1), np.expand_dims(end, 1))
    candidates = np.tril(np.triu(outer), max_answer_len - 1)
    scores_flat = candidates.flatten()
    if topk == 1:
        idx_sort = [np.argmax(scores_flat)]
    elif len(scores_flat) < topk:
        idx_sort = np.argsort(-scores_flat)
    else:
        idx = np.argpartition(-scores_flat, topk)[0:topk]
        idx_sort = idx[np.argsort(-scores_flat[idx])]
    starts, ends = np.unravel_index(idx_sort, candidates.shape)[1:]
    allowed = undesired_tokens.nonzero()
    desired = np.isin(starts, allowed) & np.isin(ends, allowed)
    starts, ends = starts[desired], ends[desired]
    return starts, ends, candidates[0, starts, ends]


def select_starts_ends(start: np.ndarray, end: np.ndarray, p_mask: np.ndarray, attention_mask: np.ndarray,
                       min_null_score: float, top_k: int, handle_impossible_answer: bool, max_answer_len: int):
    undesired_tokens = np.abs(p_mask - 1) & attention_mask
    undesired_mask = undesired_tokens == 0
    start = np.where(undesired_mask, -10000.0, start)
    end = np.where(undesired_mask, -10000.0, end)
    start = np.exp(start - start.max(axis=-1, keepdims=True))
    start = start / start.sum()
    end = np.exp(end - end.max(axis=-1, keepdims=True))
    end = end / end.sum()
    if handle_impossible_answer:
        min_null_score = min(min_null_score, float(start[0] * end[0]))
    start[0] = end[0] = 0.0
    starts, ends, scores = decode_spans(start, end, top_k, max_answer_len, undesired_tokens)
    return starts, ends, scores, min_null_score


def get_indices(encoding, s: int, e: int, sequence_index: int, align_to_words: bool) -> tuple[int, int]:
    if align_to_words:
        try:
            start_word = encoding.token_to_word(s)
            end_word = encoding.token_to_word(e)
            return (encoding.word_to_chars(start_word, sequence_index)[0],
                    encoding.word_to_chars(end_word, sequence_index)[1])
        except Exception:  # noqa: BLE001 - tokenizers without words: keep to offsets, as the pipeline
            pass
    return encoding.offsets[s][0], encoding.offsets[e][1]


def best_answers(context: str, windows: list, start_logits: list, end_logits: list, attention: list,
                 p_masks: list, question_first: bool, params: dict) -> list[dict]:
    """The pipeline's postprocess for one (question, context): the best answers over its windows."""
    top_k = params["top_k"]
    align = params["align_to_words"]
    impossible = params["handle_impossible_answer"]
    pre_topk = top_k * 2 + 10 if align else top_k
    min_null_score = 1000000.0
    answers: list[dict] = []
    sequence_index = 1 if question_first else 0
    for enc, start, end, mask, p_mask in zip(windows, start_logits, end_logits, attention, p_masks, strict=True):
        starts, ends, scores, min_null_score = select_starts_ends(
            start.astype(np.float32), end.astype(np.float32), p_mask, mask, min_null_score, pre_topk, impossible,
            params["max_answer_len"])
        for s, e, score in zip(starts, ends, scores, strict=True):
            start_index, end_index = get_indices(enc, int(s), int(e), sequence_index, align)
            text = context[start_index:end_index]
            same = next((a for a in answers if a["answer"].lower() == text.lower()), None)
            if same:
                same["score"] += float(score)
            else:
                answers.append({"score": float(score), "start": start_index, "end": end_index, "answer": text})
    if impossible:
        answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
    return sorted(answers, key=lambda a: a["score"], reverse=True)[:top_k]
