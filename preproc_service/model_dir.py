"""Read preproc's half of a model directory: tokenizer, task, MLflow defaults, pooling config.

Two layouts are accepted:
- MLflow transformers "components": `MLmodel` (YAML: `flavors.transformers.task`,
  `flavors.python_function.config`, `signature.params`, `metadata.prompt_template`) +
  `components/tokenizer/`;
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


@dataclass
class ModelDir:
    path: Path
    tokenizer_path: Path
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
    tokenizer_path = root / "components" / "tokenizer"
    if not tokenizer_path.is_dir():
        raise FailedPrecondition(f"{root}: MLmodel found but no components/tokenizer/ directory")
    signature_params = {}
    raw_params = (doc.get("signature") or {}).get("params")
    if raw_params:
        for spec in json.loads(raw_params) if isinstance(raw_params, str) else raw_params:
            signature_params[spec["name"]] = spec.get("default")
    config = _read_json(root / "model" / "config.json") or _read_json(root / "pipeline" / "config.json") or {}
    return ModelDir(
        path=root, tokenizer_path=tokenizer_path, task=tasks.canonical(flavor.get("task")),
        inference_task=flavor.get("inference_task") or "", model_config=dict(pyfunc.get("config") or {}),
        signature_params=signature_params, prompt_template=(doc.get("metadata") or {}).get("prompt_template"),
        config=config,
    )


def _read_plain(root: Path) -> ModelDir:
    if not (root / "tokenizer.json").is_file() and not (root / "tokenizer_config.json").is_file():
        raise FailedPrecondition(f"{root}: no MLmodel and no tokenizer files; not a model directory")
    model_dir = ModelDir(path=root, tokenizer_path=root, config=_read_json(root / "config.json") or {})
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
