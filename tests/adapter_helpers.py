"""Adapter directories and in-process references for the adapter tests and benchmark.

Every adapter is a real PEFT directory written by `PeftModel.save_pretrained` from a tiny
model of tests/model_factory.py; the reference for a request with adapter X is PeftModel
loaded from X's directory on a fresh copy of the base (the base alone for no adapter).
"""

from __future__ import annotations

import copy
from pathlib import Path

from tests import model_factory as mf

# Run-time adapter management is off by default; the tests and benchmarks turn it on with these.
TOKEN = "s3cret-adapter-token"
TOKEN_METADATA = (("authorization", f"Bearer {TOKEN}"),)


def management_flags(root) -> list[str]:
    """model_service flags that let LoadAdapter/UnloadAdapter (with TOKEN_METADATA) read under `root`."""
    return ["--adapter-management", "token", "--adapter-token", TOKEN, "--adapter-root", str(root)]


# name -> (seed, rank, target modules, task_type): different ranks and targets on purpose.
ENCODER_ADAPTERS = {
    "alpha": (11, 2, ["query", "value"], None),
    "beta": (12, 4, ["query", "key", "dense"], None),
    # SEQ_CLS puts the classifier head in modules_to_save: a full per-adapter copy of it.
    "gamma": (13, 8, ["value"], "SEQ_CLS"),
}
GPT2_ADAPTERS = {
    "alpha": (21, 2, ["c_attn"], None),
    "beta": (22, 4, ["c_attn", "c_proj"], None),
    "gamma": (23, 8, ["c_fc"], None),
}


def save_lora(base, root: Path, seed: int, r: int, target_modules, task_type=None) -> Path:
    """A LoRA adapter for `base` (left untouched) saved in PEFT format under `root`."""
    import torch

    peft_model = mf.build_lora(copy.deepcopy(base), seed=seed, r=r, target_modules=target_modules,
                               task_type=task_type)
    if task_type == "SEQ_CLS":  # make the adapter's own head differ from the base's
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "modules_to_save" in name:
                    param.add_(torch.randn_like(param) * 0.5)
    peft_model.save_pretrained(root)
    return Path(root)


def save_adapters(base, root: Path, table: dict) -> dict[str, Path]:
    return {name: save_lora(base, Path(root) / name, *spec) for name, spec in table.items()}


def reference_models(base, dirs: dict[str, Path]) -> dict:
    """name -> in-process PeftModel with that adapter active; "" -> the base model."""
    from peft import PeftModel

    refs = {name: PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval() for name, path in dirs.items()}
    refs[""] = base
    return refs


def rss_mib(pid: int | str = "self") -> float:
    """Resident set size of a process, from /proc (MiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc status")


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
