"""Does the tokenizer here agree with the model over there?

Checked at start from model_service's metadata; preproc reports SERVING only when this
returns no problems: the vocabulary fits the embedding rows, pad/eos/bos ids match, and
the task preproc serves runs on the model's head.
"""

from __future__ import annotations

from splitserve_common import tasks
from splitserve_common.v2_codec import ModelMetadata


def disagreements(tokenizer, local_task: str, info: ModelMetadata) -> list[str]:
    problems = []
    if tokenizer is None:  # e.g. audio-classification: only the task can disagree
        return _task_disagreement(local_task, info)
    vocab = len(tokenizer)
    if info.vocab_size and vocab > info.vocab_size:
        problems.append(f"tokenizer has {vocab} tokens but the model's embedding has only {info.vocab_size} rows")
    pad = tokenizer.pad_token_id
    if pad is not None and info.pad_token_id is not None and pad != info.pad_token_id:
        problems.append(f"pad_token_id differs: tokenizer {pad}, model {info.pad_token_id}")
    bos = tokenizer.bos_token_id
    if bos is not None and info.bos_token_id is not None and bos != info.bos_token_id:
        problems.append(f"bos_token_id differs: tokenizer {bos}, model {info.bos_token_id}")
    eos = tokenizer.eos_token_id
    if eos is not None and info.eos_token_ids and eos not in info.eos_token_ids:
        problems.append(f"eos_token_id differs: tokenizer {eos}, model {info.eos_token_ids}")
    return problems + _task_disagreement(local_task, info)


def _task_disagreement(local_task: str, info: ModelMetadata) -> list[str]:
    # Tasks on the same model head agree: a zero-shot model is a sequence classifier, and a plain
    # directory reports it as text-classification.
    if local_task and info.task and not tasks.same_model(local_task, info.task):
        return [f"task differs: preproc serves {local_task}, the model service {info.task}"]
    return []
