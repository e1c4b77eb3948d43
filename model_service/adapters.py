"""PEFT adapters on one base model: load, unload, list, and per-row selection in a batch.

LoRA layers are injected into the served model in place (peft's `inject_adapter_in_model`),
so the model object the engine holds never changes. Every adapter layer is left inactive:
a forward pass outside `use(...)` is the base model. `use(names)` installs pre-forward hooks
that pass peft's per-row `adapter_names` to each adapter layer, so one batch can mix rows for
several adapters and the base ("__base__") without any global "active adapter".

Unloading deletes the adapter from every layer (peft's delete_adapter); a layer left with no
adapter is replaced by its original module, so after the last unload the model is exactly the
base again (same modules, same parameters) and the memory is released.

Thread use: `load`/`unload` and forwards inside `use()` run on the engine's one worker thread;
`check`, `lease`, `info`, `list` may be called from the event loop (a lock guards the bookkeeping).
"""

from __future__ import annotations

import json
import re
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from splitserve_common import memory
from splitserve_common.errors import FailedPrecondition, InvalidArgument, NotFound

BASE = "__base__"  # peft's name for "no adapter" in per-row adapter_names
BASE_REQUEST_NAME = "base"  # what a request names to get the base model when a default adapter is set
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    method: str               # LORA, ADALORA, IA3 (peft_type)
    rank: int
    target_modules: tuple[str, ...]
    weight_bytes: int
    source: str


@dataclass
class AdapterFiles:
    """An adapter directory read from disk and checked on its own (before touching the model)."""

    path: Path
    config: object            # peft.PeftConfig
    state: dict = field(repr=False)  # tensor name -> tensor, as saved (no adapter name in keys)

    @property
    def method(self) -> str:
        return str(getattr(self.config.peft_type, "value", self.config.peft_type))

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())

    @property
    def target_modules(self) -> tuple[str, ...]:
        targets = self.config.target_modules
        if targets is None:
            return ()
        return (targets,) if isinstance(targets, str) else tuple(sorted(targets))


def read_adapter_dir(path: str | Path, allow_pickle: bool = False) -> AdapterFiles:
    """Read `adapter_config.json` + weights; refuse what the mixed-batch inference path cannot serve."""
    from peft import PeftConfig

    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise NotFound(f"no PEFT adapter at {path}: adapter_config.json is missing")
    try:
        config = PeftConfig.from_pretrained(str(path))
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{path}/adapter_config.json is not a valid PEFT config: {exc}") from exc
    check_method(config, path)
    return AdapterFiles(path=path, config=config, state=read_weights(path, allow_pickle))


def check_method(config, path: Path) -> None:
    method = str(getattr(config.peft_type, "value", config.peft_type))
    if method != "LORA":
        # IA3 and AdaLoRA layers have no per-row (mixed batch) forward in peft, and serving them would
        # need one global active adapter; refuse rather than serialise every request on it.
        raise FailedPrecondition(
            f"adapter {path}: method {method} is not supported; only LORA adapters can be mixed per row "
            "in a batch (peft's adapter_names inference path)")
    if getattr(config, "use_dora", False):
        raise FailedPrecondition(f"adapter {path}: DoRA adapters cannot be mixed per row in a batch (peft refuses "
                                 "adapter_names with DoRA)")
    if getattr(config, "target_parameters", None):
        raise FailedPrecondition(f"adapter {path}: LoRA on target_parameters is not supported")
    if getattr(config, "layer_replication", None):
        raise FailedPrecondition(f"adapter {path}: layer_replication changes the base model; not supported")
    if getattr(config, "trainable_token_indices", None):
        raise FailedPrecondition(f"adapter {path}: trainable_token_indices is not supported")


def read_weights(path: Path, allow_pickle: bool) -> dict:
    safetensors_path = path / SAFETENSORS_FILE
    if safetensors_path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(safetensors_path))
        except SafetensorError as exc:
            raise InvalidArgument(f"{safetensors_path} is not a readable safetensors file: {exc}") from exc
    if (path / PICKLE_FILE).is_file():
        if not allow_pickle:
            raise InvalidArgument(f"{path} holds only pickle weights ({PICKLE_FILE}); pickle can run code on "
                                  "load, so it is refused: convert to safetensors or start with --allow-pickle")
        import torch

        return torch.load(str(path / PICKLE_FILE), map_location="cpu", weights_only=True)
    raise InvalidArgument(f"{path} has no adapter weights ({SAFETENSORS_FILE})")


def check_name(name: str) -> None:
    if name == BASE_REQUEST_NAME:
        raise InvalidArgument(f"adapter name {name!r} is reserved: requests name it to get the base model")
    if not NAME_PATTERN.fullmatch(name or "") or name == BASE:
        raise InvalidArgument(f"adapter name {name!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit")


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise), so RSS reflects an unload.

    The adapter's tensors are already freed by reference counting when its layers go; no
    gc.collect() here: a full collection takes ~0.5 s and would stall the engine's worker.
    """
    memory.release_free_memory()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class AdapterRegistry:
    """The adapters attached to one model, by name."""

    def __init__(self, model):
        self.model = model
        self._infos: dict[str, AdapterInfo] = {}
        self._configs: dict = {}
        self._draining: set[str] = set()
        self._in_use: dict[str, int] = {}
        self._lock = threading.Lock()
        self._hooked_layers: list = []  # modules that take adapter_names, refreshed on load/unload
        self.default = ""  # adapter for requests that name none ("" = the base model); see set_default

    # --- queries (any thread) -------------------------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._infos)

    def list(self) -> list[AdapterInfo]:
        with self._lock:
            return [self._infos[n] for n in sorted(self._infos)]

    def info(self, name: str) -> AdapterInfo:
        with self._lock:
            if name not in self._infos:
                raise NotFound(self._unknown(name))
            return self._infos[name]

    def set_default(self, name: str) -> None:
        """Requests that name no adapter use `name` (a loaded adapter; "" = the base model)."""
        if name and name not in self.names():
            raise NotFound(self._unknown(name))
        self.default = name

    def _requested(self, name: str) -> str:
        """A request's adapter name -> the adapter meant ("" = base): none named = the default."""
        if not name:
            return self.default
        return "" if name in (BASE_REQUEST_NAME, BASE) else name

    def require(self, name: str) -> str:
        """The canonical per-row name for a request's adapter (BASE = the base model); NOT_FOUND when unknown."""
        name = self._requested(name)
        if not name:
            return BASE
        with self._lock:
            if name not in self._infos or name in self._draining:
                raise NotFound(self._unknown(name))
        return name

    @contextmanager
    def lease(self, name: str):
        """Hold `name` for the length of one request, so an unload waits for it; yields the per-row name."""
        name = self._requested(name)
        if not name:
            yield BASE
            return
        with self._lock:
            if name not in self._infos or name in self._draining:
                raise NotFound(self._unknown(name))
            self._in_use[name] = self._in_use.get(name, 0) + 1
        try:
            yield name
        finally:
            with self._lock:
                self._in_use[name] -= 1
                if not self._in_use[name]:
                    del self._in_use[name]

    def in_use(self, name: str) -> int:
        with self._lock:
            return self._in_use.get(name, 0)

    def begin_unload(self, name: str) -> AdapterInfo:
        """Refuse new requests for `name` (NOT_FOUND) while the ones in flight finish."""
        if name and name == self.default:
            raise FailedPrecondition(f"adapter {name!r} serves the requests that name no adapter "
                                     "(--default-adapter); restart with another default to unload it")
        with self._lock:
            if name not in self._infos or name in self._draining:
                raise NotFound(self._unknown(name))
            self._draining.add(name)
            return self._infos[name]

    def cancel_unload(self, name: str) -> None:
        with self._lock:
            self._draining.discard(name)

    def _unknown(self, name: str) -> str:
        loaded = ", ".join(sorted(set(self._infos) - self._draining)) or "none"
        return f"unknown adapter {name!r} (loaded: {loaded})"

    # --- model changes (engine worker thread) ---------------------------------------------

    def load(self, name: str, path: str | Path, allow_pickle: bool = False) -> AdapterInfo:
        """Read a PEFT directory and attach it under `name`."""
        check_name(name)
        with self._lock:
            if name in self._infos:
                raise FailedPrecondition(f"adapter {name!r} is already loaded (from {self._infos[name].source}); "
                                         "unload it first")
        return self.attach(name, read_adapter_dir(path, allow_pickle))

    def attach(self, name: str, files: AdapterFiles) -> AdapterInfo:
        """Inject `files` into the model under `name`; on any incompatibility undo it and refuse."""
        import torch
        from peft import inject_adapter_in_model, set_peft_model_state_dict

        check_name(name)
        with self._lock:
            if name in self._infos:
                raise FailedPrecondition(f"adapter {name!r} is already loaded; unload it first")
        config = files.config
        config.inference_mode = True
        try:
            with warnings.catch_warnings():
                # model.peft_config already holding the other adapters is what we want here.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                inject_adapter_in_model(config, self.model, adapter_name=name)
        except (ValueError, TypeError, KeyError) as exc:
            self._detach(name)
            raise InvalidArgument(f"adapter {files.path} does not fit the base model "
                                  f"{type(self.model).__name__}: {exc}") from exc
        self._configs[name] = config
        try:
            with torch.no_grad():
                # Saved keys are relative to a PeftModel ("base_model.model." + the model's own names).
                state = {k.removeprefix(PEFT_PREFIX): v for k, v in files.state.items()}
                result = set_peft_model_state_dict(self.model, state, adapter_name=name)
            missing = [k for k in result.missing_keys if f".{name}." in k or k.endswith(f".{name}")]
            if missing:
                raise ValueError(f"the weights lack {len(missing)} tensors the config targets, e.g. {missing[0]}")
            if result.unexpected_keys:
                raise ValueError(f"the weights hold {len(result.unexpected_keys)} tensors for modules the base "
                                 f"model does not have, e.g. {result.unexpected_keys[0]}")
        except (RuntimeError, ValueError, KeyError) as exc:  # size mismatch is a RuntimeError
            self._detach(name)
            raise InvalidArgument(f"adapter {files.path} does not fit the base model "
                                  f"{type(self.model).__name__}: {_first_lines(exc)}") from exc
        self._deactivate_layers()
        info = AdapterInfo(name=name, method=files.method, rank=int(getattr(config, "r", 0) or 0),
                           target_modules=files.target_modules, weight_bytes=files.weight_bytes,
                           source=str(files.path))
        with self._lock:
            self._infos[name] = info
        self._refresh_layers()
        return info

    def unload(self, name: str) -> AdapterInfo:
        """Remove `name`'s layers and weights from the model."""
        with self._lock:
            if name not in self._infos:
                raise NotFound(self._unknown(name))
            info = self._infos.pop(name)
            self._draining.discard(name)
        self._detach(name)
        release_freed_memory()
        return info

    def _detach(self, name: str) -> None:
        """Delete adapter `name` from every layer, unwrap layers left empty, forget its config."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        self._configs.pop(name, None)
        for module_name, module in list(self.model.named_modules()):
            if isinstance(module, BaseTunerLayer):
                module.set_adapter([])  # keep layers inactive: no hooks = base model
                if name in module._all_available_adapter_names():
                    module.delete_adapter(name)
                if not module._all_available_adapter_names():
                    self._replace(module_name, module.get_base_layer())
            elif isinstance(module, AuxiliaryTrainingWrapper):
                if name in module._get_available_adapters():
                    module.delete_adapter(name, new_active_adapters=[])
                if not module._get_available_adapters():
                    self._replace(module_name, module.original_module)
        if self._configs:
            self.model.peft_config = dict(self._configs)
        elif hasattr(self.model, "peft_config"):
            del self.model.peft_config
        self._refresh_layers()

    def _replace(self, module_name: str, new_module) -> None:
        parent_name, _, child = module_name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, new_module)

    def _deactivate_layers(self) -> None:
        """Every adapter layer inactive: a forward outside `use()` is the base model."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        for module in self.model.modules():
            if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
                module.set_adapter([], inference_mode=True)
        self.model.peft_config = dict(self._configs)

    def _refresh_layers(self) -> None:
        """Remember each adapter layer with the adapters it holds (a layer may hold only some)."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        layers = []
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                layers.append((module, frozenset(module._all_available_adapter_names())))
            elif isinstance(module, AuxiliaryTrainingWrapper):
                layers.append((module, frozenset(module._get_available_adapters())))
        self._hooked_layers = layers

    # --- the engine's adapter switch (see model_service/engine.py) ------------------------

    def check(self, name: str) -> None:
        """Event loop, on admission: NOT_FOUND for an unknown (or unloading) adapter."""
        self.require(name)

    @contextmanager
    def use(self, adapter):
        """Worker thread: forwards inside the block run with `adapter`.

        `adapter` is one name for every row ("" or BASE = the base model), or a list with one
        name per row of the batch (mixed batch: every forward's batch size must equal its length).
        """
        if isinstance(adapter, str):
            names = None if adapter in ("", BASE) else adapter
        else:
            names = [name or BASE for name in adapter]
            if all(name == BASE for name in names):
                names = None
        if names is None or not self._hooked_layers:
            yield  # adapter layers are inactive: this is the base model
            return
        with self._lock:
            gone = {names} if isinstance(names, str) else set(names) - {BASE}
            gone -= set(self._infos)
        if gone:
            raise NotFound(f"adapter(s) {', '.join(sorted(gone))} were unloaded while the request waited")
        handles = []
        for layer, held in self._hooked_layers:
            # A layer without a row's adapter computes that row as the base (peft's modules_to_save
            # wrappers would fail on a name they lack); a layer with none of them needs no hook.
            if isinstance(names, str):
                if names not in held:
                    continue
                hook = _same_rows_hook(names)
            else:
                layer_names = [name if name in held else BASE for name in names]
                if all(name == BASE for name in layer_names):
                    continue
                hook = _fixed_rows_hook(layer_names)
            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _fixed_rows_hook(names: list[str]):
    """Pass peft's per-row `adapter_names` to an adapter layer."""
    def hook(module, args, kwargs):
        kwargs["adapter_names"] = names
        return args, kwargs

    return hook


def _same_rows_hook(name: str):
    """Every row uses `name`, whatever the batch size of this layer's input."""
    def hook(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        kwargs["adapter_names"] = [name] * len(x)
        return args, kwargs

    return hook


def _first_lines(exc: BaseException, n: int = 3) -> str:
    return " ".join(str(exc).strip().splitlines()[:n])
