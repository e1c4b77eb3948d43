"""token-classification: transformers' TokenClassificationPipeline preprocess/postprocess, numpy only.

gather_pre_entities / aggregate / aggregate_word(s) / group_sub_entities / group_entities keep
the pipeline's names and rules (transformers 5 pipelines/token_classification.py).
"""

from __future__ import annotations

import numpy as np

from preproc_service.deployment import Deployment, RequestScope
from preproc_service.tasks.common import softmax
from splitserve_common.errors import InvalidArgument

STRATEGIES = ("none", "simple", "first", "average", "max")


def sanitize_parameters(dep: Deployment, params: dict) -> dict:
    strategy = str(params.get("aggregation_strategy")).lower()
    if strategy not in STRATEGIES:
        raise InvalidArgument(f"aggregation_strategy must be one of {', '.join(STRATEGIES)}, "
                              f"got {params.get('aggregation_strategy')!r}")
    dep.require_info()  # labels come from the model service
    return {"aggregation_strategy": strategy, "ignore_labels": list(params.get("ignore_labels") or [])}


async def preprocess(dep: Deployment, inputs: list[str], params: dict) -> dict:
    dep.limits.check_inputs(inputs)
    encodings = await dep.tokenization.encode_truncating(inputs, params.get("truncation", True))
    return {"batch": dep.pad(encodings), "texts": inputs, "encodings": encodings}


async def forward(dep: Deployment, scope: RequestScope, model_inputs: dict, params: dict) -> dict:
    return await dep.forward(scope, model_inputs["batch"], ["logits"])


def postprocess(dep: Deployment, model_inputs: dict, model_outputs: dict, params: dict) -> list[list[dict]]:
    classifier = TokenClassifier(dep.tokenizer, dep.require_info().id2label)
    logits = model_outputs["logits"]
    return [classifier.entities(text, enc, logits[i], params["aggregation_strategy"], params["ignore_labels"])
            for i, (text, enc) in enumerate(zip(model_inputs["texts"], model_inputs["encodings"], strict=True))]


class TokenClassifier:
    """Postprocess for one deployment: needs the tokenizer (token strings) and the labels."""

    def __init__(self, tokenizer, id2label: dict[int, str]):
        self.tokenizer = tokenizer
        self.id2label = id2label
        backend_model = tokenizer.backend_tokenizer.model
        self.has_subword_prefix = bool(getattr(backend_model, "continuing_subword_prefix", None))

    def entities(self, sentence: str, encoding, logits: np.ndarray, strategy: str,
                 ignore_labels: list[str]) -> list[dict]:
        """The pipeline's postprocess for one sentence: entities without the ignored labels."""
        n = len(encoding.ids)
        scores = softmax(logits[:n].astype(np.float32))
        pre_entities = self.gather_pre_entities(sentence, encoding, scores)
        entities = self.aggregate(pre_entities, strategy)
        return [e for e in entities
                if e.get("entity") not in ignore_labels and e.get("entity_group") not in ignore_labels]

    def gather_pre_entities(self, sentence: str, encoding, scores: np.ndarray) -> list[dict]:
        pre_entities = []
        unk_id = self.tokenizer.unk_token_id
        for idx, token_scores in enumerate(scores):
            if encoding.special_tokens_mask[idx]:
                continue
            token_id = encoding.ids[idx]
            word = encoding.tokens[idx]
            start, end = encoding.offsets[idx]
            word_ref = sentence[start:end]
            if self.has_subword_prefix:
                is_subword = len(word) != len(word_ref)
            else:
                # The pipeline's fallback heuristic for tokenizers without real words.
                is_subword = start > 0 and " " not in sentence[start - 1:start + 1]
            if token_id == unk_id:
                word = word_ref
                is_subword = False
            pre_entities.append({"word": word, "scores": token_scores, "start": start, "end": end, "index": idx,
                                 "is_subword": is_subword})
        return pre_entities

    def aggregate(self, pre_entities: list[dict], strategy: str) -> list[dict]:
        if strategy in ("none", "simple"):
            entities = []
            for pre in pre_entities:
                best = int(pre["scores"].argmax())
                entities.append({"entity": self.id2label[best], "score": float(pre["scores"][best]),
                                 "index": pre["index"], "word": pre["word"], "start": pre["start"],
                                 "end": pre["end"]})
        else:
            entities = self.aggregate_words(pre_entities, strategy)
        if strategy == "none":
            return entities
        return self.group_entities(entities)

    def aggregate_word(self, entities: list[dict], strategy: str) -> dict:
        word = self.tokenizer.convert_tokens_to_string([e["word"] for e in entities])
        if strategy == "first":
            scores = entities[0]["scores"]
        elif strategy == "max":
            scores = max(entities, key=lambda e: e["scores"].max())["scores"]
        else:  # average
            scores = np.nanmean(np.stack([e["scores"] for e in entities]), axis=0)
        best = int(scores.argmax())
        return {"entity": self.id2label[best], "score": float(scores[best]), "word": word,
                "start": entities[0]["start"], "end": entities[-1]["end"]}

    def aggregate_words(self, entities: list[dict], strategy: str) -> list[dict]:
        """Force agreement on word boundaries: sub-word tokens join the word they continue."""
        word_entities, group = [], None
        for entity in entities:
            if group is None:
                group = [entity]
            elif entity["is_subword"]:
                group.append(entity)
            else:
                word_entities.append(self.aggregate_word(group, strategy))
                group = [entity]
        if group is not None:
            word_entities.append(self.aggregate_word(group, strategy))
        return word_entities

    def group_sub_entities(self, entities: list[dict]) -> dict:
        return {
            "entity_group": entities[0]["entity"].split("-", 1)[-1],
            "score": float(np.nanmean([e["score"] for e in entities])),
            "word": self.tokenizer.convert_tokens_to_string([e["word"] for e in entities]),
            "start": entities[0]["start"],
            "end": entities[-1]["end"],
        }

    @staticmethod
    def get_tag(entity_name: str) -> tuple[str, str]:
        if entity_name.startswith("B-"):
            return "B", entity_name[2:]
        if entity_name.startswith("I-"):
            return "I", entity_name[2:]
        return "I", entity_name  # not in B/I format: "I" so that adjacent equal tags merge

    def group_entities(self, entities: list[dict]) -> list[dict]:
        groups, current = [], []
        for entity in entities:
            if not current:
                current.append(entity)
                continue
            bi, tag = self.get_tag(entity["entity"])
            _, last_tag = self.get_tag(current[-1]["entity"])
            if tag == last_tag and bi != "B":
                current.append(entity)
            else:
                groups.append(self.group_sub_entities(current))
                current = [entity]
        if current:
            groups.append(self.group_sub_entities(current))
        return groups
