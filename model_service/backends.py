"""The engine boundary: what runs one batched forward pass (eager PyTorch today; compiled, ONNX Runtime or
TensorRT can be added here without touching batching or the servicers).

A backend is built once from the loaded model and called on the engine's worker threads:

    backend = BACKENDS[name](loaded)              # loaded: model_service.loader.LoadedModel
    outputs = backend(inputs, hidden_states)
        inputs: {input name: tensor} on the model's device, rows padded (right) to one length, with
        `attention_mask` (the batcher builds it); hidden_states: also return `last_hidden_state`
        (models whose native outputs lack it). Returns {output name: tensor}, batch first; values at
        padded positions may be anything (the batcher zeroes them when it cuts rows back).
    backend.supports_adapters                     # True: LoRA adapter hooks on the torch modules apply
                                                  # (engine.adapters.use around the call)
    backend.padding_free                          # True: a pass costs its rows' own tokens, not rows x
                                                  # longest row (the batcher then groups rows by count only)
    backend.padded                                # optional: the backend to call while adapter hooks are
                                                  # on (they apply per row of a padded batch)

Every backend must answer like the eager model within float tolerance; the output catalog is what
the backend returns on the warm-up pass (served_model.discover). Generation steps, adapter loads and
other work that needs the torch module itself use `engine.model`, not the backend.
To add one: a class with that call and attributes, an entry in BACKENDS (the `--engine` flag's
choices); tests/test_engine.py shows a second backend plugged in with equal answers.
"""

from __future__ import annotations

import torch

from model_service.packed_bert import packed_forward


class PaddedEagerBackend:
    """The transformers model's own forward in eager PyTorch, on the padded batch."""

    supports_adapters = True
    padding_free = False

    def __init__(self, loaded):
        self.model = loaded.model

    def __call__(self, inputs: dict, hidden_states: bool = False) -> dict:
        out = self.model(**inputs, output_hidden_states=hidden_states, return_dict=True)
        result = {name: value for name, value in out.items() if isinstance(value, torch.Tensor)}
        if hidden_states and "last_hidden_state" not in result and out.get("hidden_states") is not None:
            result["last_hidden_state"] = out["hidden_states"][-1]
        return result


class EagerBackend:
    """Eager PyTorch, padding-free where model_service/packed_bert.py covers the model (BERT encoders: the
    rows' tokens packed, no work on padding), the model's own padded forward otherwise."""

    supports_adapters = True

    def __init__(self, loaded):
        self.padded = PaddedEagerBackend(loaded)
        self._packed = packed_forward(loaded.model)
        self.padding_free = self._packed is not None

    def __call__(self, inputs: dict, hidden_states: bool = False) -> dict:
        if self._packed is not None:
            out = self._packed(inputs, hidden_states)
            if out is not None:
                return out
        return self.padded(inputs, hidden_states)


BACKENDS = {"eager": EagerBackend, "eager-padded": PaddedEagerBackend}
