"""The input tensors a served model takes over ModelInfer, by kind of model.

- text models: `input_ids` `[B, L]` (+ `attention_mask`, `token_type_ids` `[B, L]`); TAPAS takes
  `token_type_ids` `[B, L, K]`, one column per entry of `config.type_vocab_sizes`;
- audio models whose main input is the waveform (wav2vec2, HuBERT, ...): `input_values` FP32
  `[B, T]` (+ `attention_mask`); every row is a whole clip (no padding), because a
  padded waveform changes what models without an attention mask compute;
- models whose main input is a feature matrix (Whisper's `input_features` `[B, mel, frames]`,
  fixed frames): `input_features` FP32 `[B, mel, frames]`, batched only with rows of the same shape
  (Whisper's encoder classifiers; Whisper's encoder-decoder has no ModelInfer outputs).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatype: str            # INT64 | FP32
    shape: tuple[int, ...]   # -1 = any size; first axis is the batch

    @property
    def floating(self) -> bool:
        return self.datatype == "FP32"


def token_type_columns(config) -> int:
    """TAPAS-style models: how many token-type columns (len(type_vocab_sizes)); 0 for plain token types."""
    sizes = getattr(config, "type_vocab_sizes", None)
    return len(sizes) if isinstance(sizes, (list, tuple)) else 0


def input_specs(loaded) -> dict[str, InputSpec]:
    """name -> spec of every input ModelInfer accepts for this model; the first is the main input."""
    main = getattr(loaded.model, "main_input_name", "input_ids")
    if main == "input_values":
        return {"input_values": InputSpec("input_values", "FP32", (-1, -1)),
                "attention_mask": InputSpec("attention_mask", "INT64", (-1, -1))}
    if main != "input_ids":
        return {main: InputSpec(main, "FP32", (-1, -1, -1))}
    specs = {"input_ids": InputSpec("input_ids", "INT64", (-1, -1)),
             "attention_mask": InputSpec("attention_mask", "INT64", (-1, -1))}
    columns = token_type_columns(loaded.config)
    if columns:
        specs["token_type_ids"] = InputSpec("token_type_ids", "INT64", (-1, -1, columns))
    elif loaded.type_vocab_size:
        specs["token_type_ids"] = InputSpec("token_type_ids", "INT64", (-1, -1))
    return specs
