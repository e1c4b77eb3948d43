"""zero-shot-classification: transformers' ZeroShotClassificationPipeline, numpy only.

Each text is paired with `hypothesis_template.format(label)` for every candidate label
(truncating only the text), and all pairs of all texts go to the model in one request.
"""

from __future__ import annotations

import numpy as np

from preproc_service.deployment import Call, Deployment
from preproc_service.tasks.common import require_texts
from preproc_service.tokenization import pad_batch
from splitserve_common.errors import InvalidArgument


def entailment_id(id2label: dict[int, str]) -> int:
    """The pipeline's rule: the first label whose name starts with "entail"; -1 when none does."""
    for index, label in sorted(id2label.items()):
        if label.lower().startswith("entail"):
            return index
    return -1


def parse_labels(labels) -> list[str]:
    if isinstance(labels, str):
        labels = labels.split(",")
    return [label.strip() for label in labels if label.strip()]


def check_template(template: str, label: str) -> None:
    if template.format(label) == template:
        raise InvalidArgument(
            f"hypothesis_template {template!r} does not place the label: it needs a {{}} (e.g. 'This is {{}}.')")


def postprocess(sequence: str, logits: np.ndarray, labels: list[str], entail: int, multi_label: bool) -> dict:
    """`logits`: [len(labels), num_nli_labels] for one sequence."""
    logits = logits.astype(np.float32)
    if multi_label or len(labels) == 1:
        contradiction = -1 if entail == 0 else 0
        pair = logits[:, [contradiction, entail]]
        scores = (np.exp(pair) / np.exp(pair).sum(-1, keepdims=True))[:, 1]
    else:
        entail_logits = logits[:, entail]
        scores = np.exp(entail_logits) / np.exp(entail_logits).sum(-1, keepdims=True)
    order = list(reversed(scores.argsort()))
    return {"sequence": sequence, "labels": [labels[i] for i in order], "scores": [float(scores[i]) for i in order]}


async def run(dep: Deployment, call: Call, texts: list[str], labels, params: dict) -> list[dict]:
    require_texts(texts)
    labels = parse_labels(labels)
    if not labels:
        raise InvalidArgument("candidate_labels is empty: zero-shot classification needs at least one label")
    template = params["hypothesis_template"]
    check_template(template, labels[0])
    info = dep.require_info()
    entail = entailment_id(info.id2label)
    pairs = [(text, template.format(label)) for text in texts for label in labels]
    with call.stage("tokenize"):
        encodings = await dep.tokenization.encode_truncating(pairs, True, strategy="only_first")
    inputs = pad_batch(encodings, dep.tokenization.pad_token_id, dep.uses_token_type_ids)
    logits = (await dep.forward(call, inputs, ["logits"]))["logits"]
    n = len(labels)
    with call.stage("postprocess"):
        return [postprocess(text, logits[i * n:(i + 1) * n], labels, entail, bool(params["multi_label"]))
                for i, text in enumerate(texts)]
