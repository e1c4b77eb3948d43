"""Read preproc's half of a model directory: tokenizer, task, MLflow defaults, pooling config.

Two layouts are accepted:
- MLflow transformers "components": `MLmodel` (YAML: `flavors.transformers.task`,
  `flavors.python_function.config`, `signature.params`, `metadata.prompt_template`) +
  `components/tokenizer/` and/or `components/feature_extractor/`, `components/processor/`,
  `components/image_processor/` (audio and vision models; a processor directory holds both a
  tokenizer and a feature extractor);
- a plain save_pretrained directory, optionally with sentence-transformers
  `modules.json` / `1_Pooling/config.json` / `sentence_bert_config.json`.
Weights are never opened here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from splitserve_common import tasks
from splitserve_common.errors import FailedPrecondition

log = logging.getLogger(__name__)

# sentence-transformers pooling config keys -> our pooling names.
_ST_POOLING_KEYS = [("pooling_mode_cls_token", "cls"), ("pooling_mode_mean_tokens", "mean"),
                    ("pooling_mode_max_tokens", "max")]


# MLflow component directories beside the tokenizer (components/<name>/).
PROCESSOR_COMPONENTS = ("feature_extractor", "processor", "image_processor")


@dataclass
class ModelDir:
    path: Path
    tokenizer_path: Path | None         # None: the model has no tokenizer (e.g. audio-classification)
    feature_extractor_path: Path | None = None  # preprocessor_config.json of an audio model
    image_processor_path: Path | None = None
    task: str = ""                      # "" when the directory does not say
    inference_task: str = ""            # llm/v1/... when saved with one
    model_config: dict = field(default_factory=dict)       # MLmodel python_function.config
    signature_params: dict = field(default_factory=dict)   # name -> default, from MLmodel signature.params
    prompt_template: str | None = None
    pooling: str | None = None          # sentence-transformers pooling mode, None without one
    normalize: bool = False             # sentence-transformers Normalize module present
    max_seq_length: int | None = None   # sentence-transformers truncation length
    config: dict = field(default_factory=dict)  # config.json when readable (labels before the handshake)


def read_model_dir(path: str | Path) -> ModelDir:
    root = Path(path)
    if not root.is_dir():
        raise FailedPrecondition(f"model directory {root} does not exist")
    mlmodel = root / "MLmodel"
    if mlmodel.is_file():
        return _read_mlflow(root, yaml.safe_load(mlmodel.read_text()) or {})
    return _read_plain(root)


def _read_mlflow(root: Path, doc: dict) -> ModelDir:
    flavor = (doc.get("flavors") or {}).get("transformers") or {}
    pyfunc = (doc.get("flavors") or {}).get("python_function") or {}
    components = root / "components"
    found = {name: components / name for name in ("tokenizer", *PROCESSOR_COMPONENTS) if (components / name).is_dir()}
    if not found:
        raise FailedPrecondition(f"{root}: MLmodel found but no components/ directory of tokenizer, "
                                 f"{', '.join(PROCESSOR_COMPONENTS)}")
    processor = found.get("processor")
    tokenizer_path = found.get("tokenizer") or (processor if _has_tokenizer(processor) else None)
    feature_extractor_path = found.get("feature_extractor") or (processor if _has_features(processor) else None)
    signature_params = {}
    raw_params = (doc.get("signature") or {}).get("params")
    if raw_params:
        for spec in json.loads(raw_params) if isinstance(raw_params, str) else raw_params:
            signature_params[spec["name"]] = spec.get("default")
    config = _read_json(root / "model" / "config.json") or _read_json(root / "pipeline" / "config.json") or {}
    return ModelDir(
        path=root, tokenizer_path=tokenizer_path, feature_extractor_path=feature_extractor_path,
        image_processor_path=found.get("image_processor"), task=tasks.canonical(flavor.get("task")),
        inference_task=flavor.get("inference_task") or "", model_config=dict(pyfunc.get("config") or {}),
        signature_params=signature_params, prompt_template=(doc.get("metadata") or {}).get("prompt_template"),
        config=config,
    )


def _has_features(path: Path | None) -> bool:
    """A feature extractor config: preprocessor_config.json (transformers 4), or inside a transformers 5
    processor_config.json."""
    if path is None:
        return False
    if (path / "preprocessor_config.json").is_file():
        return True
    return "feature_extractor" in (_read_json(path / "processor_config.json") or {})


def _has_tokenizer(path: Path | None) -> bool:
    return path is not None and any((path / name).is_file() for name in
                                    ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt"))


def _read_plain(root: Path) -> ModelDir:
    features = root if _has_features(root) else None
    if not _has_tokenizer(root) and features is None:
        raise FailedPrecondition(f"{root}: no MLmodel, no tokenizer files and no preprocessor_config.json; "
                                 "not a model directory")
    model_dir = ModelDir(path=root, tokenizer_path=root if _has_tokenizer(root) else None,
                         feature_extractor_path=features, config=_read_json(root / "config.json") or {})
    modules = _read_json(root / "modules.json") or []
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            pooling_cfg = _read_json(root / module.get("path", "") / "config.json") or {}
            model_dir.pooling = next((name for key, name in _ST_POOLING_KEYS if pooling_cfg.get(key)), "mean")
        elif kind.endswith("Normalize"):
            model_dir.normalize = True
    st_config = _read_json(root / "sentence_bert_config.json") or {}
    model_dir.max_seq_length = st_config.get("max_seq_length")
    if model_dir.pooling:
        # A sentence-transformers directory is an embedding model.
        model_dir.task = "feature-extraction"
    return model_dir


def _read_json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None
