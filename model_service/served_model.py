"""What the service tells clients about the served model: inputs, outputs, metadata parameters.

The output catalog is discovered by the warm-up forward pass (`discover`), so it is exactly
what the loaded model returns, plus `sentence_embedding` derived from `last_hidden_state`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model_service.inputs import InputSpec, input_specs, token_type_columns
from model_service.loader import LoadedModel
from model_service.shaping import DERIVED, SEQUENCE_OUTPUTS, has_sequence_axis
from splitserve_common import tasks
from splitserve_common.v2_codec import ModelMetadata, TensorSpec


@dataclass
class ServedModel:
    """The model as this service serves it: its name, the loaded weights, the output catalog and limits.
    `metadata()` turns it into the published contract (splitserve_common.v2_codec.ModelMetadata)."""
    name: str
    loaded: LoadedModel
    max_batch_size: int
    outputs: dict[str, tuple[str, list[int]]] = field(default_factory=dict)  # name -> (datatype, shape)
    native_outputs: set[str] = field(default_factory=set)  # returned without output_hidden_states
    default_outputs: list[str] = field(default_factory=list)
    versions: tuple[str, ...] = ("1",)
    max_message_bytes: int = 0  # the largest answer that can be sent (--max-message-mb); 0 = no limit
    adapter_names: callable = list  # () -> list of loaded adapter names (engine.adapters.names)
    default_adapter: callable = str  # () -> adapter of requests that name none ("" = base)
    input_specs: dict[str, InputSpec] = field(default_factory=dict)  # main input first
    max_queue_rows: int = 0  # the batcher's --max-queue-rows, published so callers refuse what never fits
    max_input_values: int = 0  # longest input_values row (audio samples) a request may send; 0 = no limit

    @property
    def output_names(self) -> list[str]:
        return list(self.outputs)

    @property
    def max_positions(self) -> int:
        return self.loaded.max_positions

    @property
    def input_names(self) -> list[str]:
        return list(self.input_specs)

    @property
    def per_token_outputs(self) -> frozenset:
        """2-D outputs with one value per input position (TAPAS' cell-selection `logits`)."""
        return SEQUENCE_OUTPUTS | ({"logits"} if token_type_columns(self.loaded.config) else set())


def warmup_inputs(loaded: LoadedModel, length: int = 8) -> dict[str, torch.Tensor]:
    main = getattr(loaded.model, "main_input_name", "input_ids")
    config = loaded.config
    if main == "input_values":
        # One second of a quiet 440 Hz tone at 16 kHz: long enough for any convolutional front end.
        t = torch.arange(16000, dtype=torch.float32) / 16000
        return {"input_values": (0.1 * torch.sin(2 * torch.pi * 440 * t)).unsqueeze(0).to(loaded.device)}
    if main == "input_features":  # Whisper-style log-mel features: [1, mel bins, 2 x encoder positions]
        shape = (1, int(config.num_mel_bins), 2 * int(config.max_source_positions))
        return {"input_features": torch.zeros(shape, dtype=torch.float32, device=loaded.device)}
    vocab = max(loaded.vocab_size, 2)
    ids = torch.arange(length, dtype=torch.int64).remainder(vocab - 1).add(1).unsqueeze(0)
    return {"input_ids": ids.to(loaded.device), "attention_mask": torch.ones_like(ids).to(loaded.device)}


def discover(engine, name: str, max_batch_size: int, max_input_values: int = 0) -> ServedModel:
    """Run the warm-up forward (worker thread) and record what the model returns."""
    loaded = engine.loaded
    info = ServedModel(name=name, loaded=loaded, max_batch_size=max_batch_size,
                       adapter_names=lambda: engine.adapters.names(),
                       default_adapter=lambda: engine.adapters.default,
                       input_specs=input_specs(loaded), max_input_values=max_input_values)
    if loaded.config.is_encoder_decoder and loaded.model.can_generate():
        # Seq2seq models are served by generation; ModelInfer has no outputs for them.
        return info
    native = engine.forward(warmup_inputs(loaded))
    with_hidden = engine.forward(warmup_inputs(loaded), hidden_states=True)
    info.native_outputs = set(native)
    for out_name, tensor in {**with_hidden, **native}.items():
        if out_name == "hidden_states":
            continue
        shape = [-1] + [-1 if (i == 1 and has_sequence_axis(out_name, tensor.ndim, info.per_token_outputs)) else int(d)
                        for i, d in enumerate(tensor.shape) if i > 0]
        info.outputs[out_name] = ("FP32" if tensor.is_floating_point() else "INT64", shape)
    if "last_hidden_state" in info.outputs:
        info.outputs[DERIVED] = ("FP32", [-1, info.outputs["last_hidden_state"][1][-1]])
    task_spec = tasks.spec(loaded.task)
    wanted = task_spec.default_outputs if task_spec else ()
    info.default_outputs = [n for n in wanted if n in info.outputs] or sorted(info.native_outputs)
    return info


def metadata(info: ServedModel) -> ModelMetadata:
    """The served model as the metadata contract (splitserve_common.v2_codec.ModelMetadata)."""
    loaded, config = info.loaded, info.loaded.config
    ids = loaded.special_ids
    return ModelMetadata(
        name=info.name, versions=list(info.versions), platform="pytorch_transformers",
        inputs=[TensorSpec(spec.name, spec.datatype, list(spec.shape)) for spec in info.input_specs.values()],
        outputs=[TensorSpec(name, datatype, shape) for name, (datatype, shape) in info.outputs.items()],
        task=loaded.task,
        inference_task=loaded.inference_task,
        model_type=str(getattr(config, "model_type", "")),
        architecture=loaded.architecture,
        id2label={int(k): v for k, v in (getattr(config, "id2label", None) or {}).items()},
        problem_type=str(getattr(config, "problem_type", None) or ""),
        num_labels=len(getattr(config, "id2label", None) or {}),
        max_position_embeddings=int(loaded.max_positions),
        dtype=loaded.dtype,
        device=loaded.device,
        vocab_size=loaded.vocab_size,
        pad_token_id=loaded.pad_token_id,
        bos_token_id=ids.get("bos_token_id"),
        eos_token_ids=[int(i) for i in ids.get("eos_token_id") or []],
        decoder_start_token_id=ids.get("decoder_start_token_id"),
        is_encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)),
        type_vocab_size=loaded.type_vocab_size,
        pooling=loaded.pooling.as_dict(),
        adapters=list(info.adapter_names()),
        default_adapter=info.default_adapter(),
        max_batch_size=int(info.max_batch_size),
        max_queue_rows=int(info.max_queue_rows),
        default_outputs=list(info.default_outputs),
        main_input=next(iter(info.input_specs), "input_ids"),
        max_input_values=int(info.max_input_values),
        inputs_to_logits_ratio=int(getattr(config, "inputs_to_logits_ratio", 1) or 1),
        return_timestamps=bool(getattr(getattr(loaded.model, "generation_config", None), "return_timestamps", False)),
        aggregation_labels={int(k): v for k, v in (getattr(config, "aggregation_labels", None) or {}).items()},
        no_aggregation_label_index=getattr(config, "no_aggregation_label_index", None),
    )
