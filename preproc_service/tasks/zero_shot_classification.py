"""zero-shot-classification: transformers' ZeroShotClassificationPipeline, numpy only.

Each text is paired with `hypothesis_template.format(label)` for every candidate label
(truncating only the text), and all pairs of all texts go to the model in one request.
"""

from __future__ import annotations

import string

import numpy as np

from preproc_service.deployment import Deployment, RequestScope
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


def check_template(template) -> None:
    """The template must hold exactly the label's place, `{}` (`{0}` too), and no other field:
    `{x}`, `{1}` or a lone `{` would fail in str.format."""
    if not isinstance(template, str):
        raise InvalidArgument(f"hypothesis_template must be a string, got {template!r}")
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as exc:
        raise InvalidArgument(f"hypothesis_template {template!r} is not a format string ({exc}); write a literal "
                              "brace as {{ or }}") from None
    if not fields:
        raise InvalidArgument(
            f"hypothesis_template {template!r} does not place the label: it needs a {{}} (e.g. 'This is {{}}.')")
    for name, spec, conversion in fields:
        if name not in ("", "0") or spec or conversion:
            field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise InvalidArgument(f"hypothesis_template {template!r} has the field {field}: only {{}} (the label) "
                                  "is allowed; write a literal brace as {{ or }}")
    try:
        template.format("label")
    except (IndexError, ValueError) as exc:  # e.g. "{} and {}", or "{} {0}"
        raise InvalidArgument(f"hypothesis_template {template!r} cannot place the label: {exc}") from None


def sanitize_parameters(dep: Deployment, params: dict) -> dict:
    labels = parse_labels(params.get("candidate_labels") or [])
    if not labels:
        raise InvalidArgument("candidate_labels is empty: zero-shot classification needs at least one label")
    check_template(params["hypothesis_template"])
    dep.require_info()  # the entailment label comes from the model service
    return {"candidate_labels": labels, "multi_label": bool(params["multi_label"])}


async def preprocess(dep: Deployment, inputs: list[str], params: dict) -> dict:
    dep.limits.check_inputs(inputs)
    dep.limits.check_zero_shot_pairs(len(inputs), len(params["candidate_labels"]))
    template = params["hypothesis_template"]
    pairs = [(text, template.format(label)) for text in inputs for label in params["candidate_labels"]]
    encodings = await dep.tokenization.encode_truncating(pairs, True, strategy="only_first")
    return {"batch": dep.pad(encodings), "texts": inputs}


async def forward(dep: Deployment, scope: RequestScope, model_inputs: dict, params: dict) -> dict:
    return await dep.forward(scope, model_inputs["batch"], ["logits"])


def postprocess(dep: Deployment, model_inputs: dict, model_outputs: dict, params: dict) -> list[dict]:
    labels, logits = params["candidate_labels"], model_outputs["logits"]
    entail, n = entailment_id(dep.require_info().id2label), len(labels)
    return [label_scores(text, logits[i * n:(i + 1) * n], labels, entail, params["multi_label"])
            for i, text in enumerate(model_inputs["texts"])]


def label_scores(sequence: str, logits: np.ndarray, labels: list[str], entail: int, multi_label: bool) -> dict:
    """The pipeline's postprocess for one sequence; `logits`: [len(labels), num_nli_labels]."""
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
