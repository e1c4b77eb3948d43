"""Read a model directory into a ready-to-run torch model plus a small description of it.

Two layouts are accepted:
- MLflow's transformers "components" layout: `MLmodel` (YAML, `flavors.transformers`),
  weights in `model/` (or `pipeline/` before MLflow 2.4.1, or `local_base_model_path`),
  an optional PEFT adapter in `peft/`;
- a plain `save_pretrained` directory, optionally with sentence-transformers
  `modules.json` / `1_Pooling/config.json` / `Normalize`.

Safety: weights load from safetensors only unless `allow_pickle`, and remote code never
runs unless `trust_remote_code`; a refusal raises LoadError naming the flag to opt in.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from splitserve_common import tasks

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Suffix of config.architectures[0] -> task, for plain directories given no --task.
TASK_OF_ARCHITECTURE_SUFFIX = [
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForCTC", "automatic-speech-recognition"),
    ("ForAudioClassification", "audio-classification"),
    ("ForMaskedLM", "fill-mask"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("Model", "feature-extraction"),
]

DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "fp32": "float32",
          "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}

# Models whose position ids start after the pad id (usable length = positions - pad - 1).
OFFSET_POSITION_MODELS = {"roberta", "xlm-roberta", "camembert", "longformer", "bart", "mbart", "xlm-roberta-xl"}


class LoadError(Exception):
    """The directory cannot be served as asked; the message says why and which flag would help."""


@dataclass
class LoadOptions:
    model_dir: str
    task: str = ""            # overrides MLmodel / config
    dtype: str = "auto"       # auto = MLmodel torch_dtype, else float32
    device: str = "auto"      # auto | cpu | cuda | cuda:N
    allow_pickle: bool = False
    trust_remote_code: bool = False
    base_model_path: str = ""  # overrides MLmodel local_base_model_path
    merge_peft: bool = False  # fold an MLflow peft/ adapter into the weights instead of leaving it to the registry


@dataclass
class Pooling:
    mode: str = "mean"        # mean | cls | max
    normalize: bool = False

    def as_dict(self) -> dict:
        return {"mode": self.mode, "normalize": self.normalize}


@dataclass
class LoadedModel:
    """The model and what other parts need to know about it (served as model metadata)."""

    model: object                         # torch.nn.Module, eval mode, on `device`
    config: object                        # transformers PretrainedConfig
    task: str
    inference_task: str
    architecture: str
    device: str
    dtype: str                            # float32 | float16 | bfloat16
    max_positions: int                    # usable input length; 0 = no fixed limit
    pooling: Pooling
    source_dir: Path
    weights_dir: Path
    peft_merged: str = ""                 # adapter dir folded into the weights at load (--merge-peft)
    peft_dir: str = ""                    # MLflow peft/ left unmerged: model_service.adapters loads it by name
    special_ids: dict = field(default_factory=dict)

    @property
    def pad_token_id(self) -> int:
        pad = self.special_ids.get("pad_token_id")
        return 0 if pad is None else int(pad)

    # Cached: every request's checks read these, and a transformers config attribute read is slow.
    @functools.cached_property
    def vocab_size(self) -> int:
        return int(getattr(self.config, "vocab_size", 0) or 0)

    @functools.cached_property
    def type_vocab_size(self) -> int:
        return int(getattr(self.config, "type_vocab_size", 0) or 0)


def read_mlmodel(root: Path) -> dict:
    """flavors.transformers of an MLmodel file ({} when the directory has none)."""
    path = root / "MLmodel"
    if not path.is_file():
        return {}
    doc = yaml.safe_load(path.read_text()) or {}
    flavor = (doc.get("flavors") or {}).get("transformers")
    if flavor is None:
        raise LoadError(f"{path} has no 'transformers' flavor")
    return flavor


def weights_dir_of(root: Path, flavor: dict, base_model_path: str) -> Path:
    if base_model_path:
        return Path(base_model_path)
    if not flavor:
        return root
    for name in ("model", "pipeline"):  # pipeline/: artifacts saved before MLflow 2.4.1
        if (root / name / "config.json").is_file():
            return root / name
    if flavor.get("local_base_model_path"):
        return Path(flavor["local_base_model_path"])
    raise LoadError(f"{root}: no model/ or pipeline/ weights and no local_base_model_path in MLmodel "
                    "(hub-referenced artifacts cannot be resolved offline; pass --base-model-path)")


def check_weight_files(weights_dir: Path, allow_pickle: bool) -> None:
    if not weights_dir.is_dir():
        raise LoadError(f"weights directory {weights_dir} does not exist")
    if any(weights_dir.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in weights_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise LoadError(f"{weights_dir} holds only pickle weights ({', '.join(pickles)}); pickle can run code "
                        "on load, so it is refused: convert to safetensors or pass --allow-pickle")
    if not pickles:
        raise LoadError(f"{weights_dir} holds no weights (*.safetensors)")


def resolve_task(opts: LoadOptions, flavor: dict, config) -> str:
    if opts.task:
        return opts.task
    if flavor.get("task"):
        return flavor["task"]
    if (Path(opts.model_dir) / "modules.json").is_file():
        return "feature-extraction"
    for arch in getattr(config, "architectures", None) or []:
        for suffix, task in TASK_OF_ARCHITECTURE_SUFFIX:
            if arch.endswith(suffix):
                return task
    raise LoadError("cannot tell the task from the directory: pass --task")


def resolve_model_class(flavor: dict, task: str, config, trust_remote_code: bool):
    import transformers

    task_spec = tasks.spec(task)
    name = flavor.get("pipeline_model_type")
    if not name:
        if task_spec is None or not task_spec.auto_class:
            archs = getattr(config, "architectures", None) or []
            if not archs:
                raise LoadError(f"no model class for task {task!r}: the config names no architecture")
            name = archs[0]
        else:
            name = task_spec.auto_class
    cls = getattr(transformers, name, None)
    if cls is None:
        if trust_remote_code:
            return getattr(transformers, task_spec.auto_class if task_spec and task_spec.auto_class else "AutoModel")
        raise LoadError(f"model class {name!r} is not part of transformers; running the model's own code "
                        "is refused unless --trust-remote-code")
    return cls


def resolve_dtype(opts: LoadOptions, flavor: dict):
    import torch

    name = opts.dtype if opts.dtype and opts.dtype != "auto" else str(flavor.get("torch_dtype") or "float32")
    name = name.removeprefix("torch.")
    if name not in DTYPES:
        raise LoadError(f"unsupported dtype {name!r}; use one of float32, float16, bfloat16")
    return getattr(torch, DTYPES[name])


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LoadError(f"--device {name} asked for, but torch sees no CUDA device")
    return name


def injected_lora_state(weights_dir: Path) -> dict | None:
    """The base weights from a model/ that MLflow saved with LoRA layers injected, else None.

    `X.base_layer.weight` goes back to `X.weight`; the injected `lora_*` tensors are dropped
    (the adapter itself is applied from peft/).
    """
    from safetensors import safe_open

    files = sorted(weights_dir.glob("*.safetensors"))
    keys = []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            keys.extend(f.keys())
    if not any(".base_layer." in k or ".lora_" in k for k in keys):
        return None
    from safetensors.torch import load_file

    state = {}
    for path in files:
        for key, tensor in load_file(str(path)).items():
            if ".lora_" in key:
                continue
            state[key.replace(".base_layer.", ".")] = tensor
    return state


def sentence_transformers_pooling(root: Path) -> Pooling | None:
    modules_path = root / "modules.json"
    if not modules_path.is_file():
        return None
    modules = json.loads(modules_path.read_text())
    pooling = Pooling(mode="mean", normalize=any(m.get("type", "").endswith("Normalize") for m in modules))
    for module in modules:
        if module.get("type", "").endswith("Pooling"):
            cfg_path = root / module.get("path", "") / "config.json"
            if cfg_path.is_file():
                cfg = json.loads(cfg_path.read_text())
                if cfg.get("pooling_mode_cls_token"):
                    pooling.mode = "cls"
                elif cfg.get("pooling_mode_max_tokens"):
                    pooling.mode = "max"
                else:
                    pooling.mode = "mean"
    return pooling


def max_positions_of(config) -> int:
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            if getattr(config, "model_type", "") in OFFSET_POSITION_MODELS:
                value -= (getattr(config, "pad_token_id", None) or 0) + 1
            return value
    return 0


def special_ids_of(model, config) -> dict:
    gen = getattr(model, "generation_config", None)

    def pick(name):
        value = getattr(config, name, None)
        if value is None and gen is not None:
            value = getattr(gen, name, None)
        return value

    eos = pick("eos_token_id")
    eos = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
    pad = pick("pad_token_id")
    if pad is None and eos:
        pad = eos[0]  # decoder-only models pad with eos, as their pipelines do
    return {"pad_token_id": pad, "bos_token_id": pick("bos_token_id"), "eos_token_id": eos,
            "decoder_start_token_id": pick("decoder_start_token_id")}


def load(opts: LoadOptions) -> LoadedModel:
    """Load the directory `opts.model_dir` as described in the module docstring."""
    from transformers import AutoConfig

    root = Path(opts.model_dir)
    if not root.is_dir():
        raise LoadError(f"model directory {root} does not exist")
    flavor = read_mlmodel(root)
    weights_dir = weights_dir_of(root, flavor, opts.base_model_path)
    check_weight_files(weights_dir, opts.allow_pickle)
    config_dict = json.loads((weights_dir / "config.json").read_text())
    if config_dict.get("auto_map") and not opts.trust_remote_code:
        raise LoadError(f"{weights_dir}/config.json maps to the model's own code (auto_map); refused unless "
                        "--trust-remote-code")
    config = AutoConfig.from_pretrained(weights_dir, trust_remote_code=opts.trust_remote_code)
    task = resolve_task(opts, flavor, config)
    cls = resolve_model_class(flavor, task, config, opts.trust_remote_code)
    dtype = resolve_dtype(opts, flavor)
    device = resolve_device(opts.device)

    kwargs = {"dtype": dtype, "trust_remote_code": opts.trust_remote_code,
              "use_safetensors": None if opts.allow_pickle else True}
    peft_dir = root / "peft" if flavor.get("peft_adaptor") else None
    state = injected_lora_state(weights_dir) if any(weights_dir.glob("*.safetensors")) else None
    if state is not None:
        log.info("%s holds injected LoRA layers: loading the base weights without them", weights_dir)
        kwargs["state_dict"] = state
    model = cls.from_pretrained(None if state is not None else weights_dir, config=config, **kwargs)

    peft_merged = ""
    if peft_dir is not None:
        if not (peft_dir / "adapter_config.json").is_file():
            raise LoadError(f"MLmodel names a PEFT adapter but {peft_dir}/adapter_config.json is missing")
        if opts.merge_peft:
            from peft import PeftModel

            # Folded into the weights: fastest, but the base alone can no longer be served.
            model = PeftModel.from_pretrained(model, str(peft_dir)).merge_and_unload()
            peft_merged = str(peft_dir)

    model.to(device).eval()
    return LoadedModel(
        model=model, config=config, task=task, inference_task=str(flavor.get("inference_task") or ""),
        architecture=type(model).__name__, device=device, dtype=str(dtype).removeprefix("torch."),
        max_positions=max_positions_of(config),
        pooling=sentence_transformers_pooling(root) or Pooling(), source_dir=root, weights_dir=weights_dir,
        peft_merged=peft_merged, peft_dir=str(peft_dir) if peft_dir is not None and not peft_merged else "",
        special_ids=special_ids_of(model, config),
    )
