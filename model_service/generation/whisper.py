"""Whisper's generation rules, as `WhisperForConditionalGeneration.generate` applies them to one
30-second segment (transformers 5.x, models/whisper/generation_whisper.py):

- the decoder prompt (`_retrieve_init_tokens`): <|startoftranscript|>, then the language (the request's,
  the generation config's, or detected: the most likely language token after <|startoftranscript|>),
  the task token, and <|notimestamps|> unless timestamps are asked for; without language or task,
  the generation config's `forced_decoder_ids` give them;
- the logits rules, in generate's order: `begin_suppress_tokens` at the first generated position,
  `suppress_tokens` at every position, then with timestamps `WhisperTimeStampLogitsProcessor`'s
  rules (timestamps in pairs, never decreasing, the first token a timestamp of at most
  `max_initial_timestamp_index`, and a timestamp whenever all timestamps together are more likely
  than any text token);
- the length: `max_new_tokens` (prompt + new tokens within `max_target_positions`), else the
  generation config's `max_length` counted after the prompt, else the speech-recognition
  pipeline's default of 256; the pipeline's default of `num_beams` 5 unless the model's generation
  config or MLflow's model_config sets it.

Greedy requests run in the continuous batch (batch.py applies `SpeechRequest.process` to each row);
beam search runs `GenerationMixin.generate` with transformers' own Whisper processors, as
`generate_with_fallback` calls it. The loop over segments of a clip (seek) and the pipeline's
chunking are preproc_service's: each segment is one request.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from splitserve_common.errors import InvalidArgument

LANGUAGE_SLOT = -1  # a prompt position the model fills with the detected language
PIPELINE_MAX_NEW_TOKENS = 256  # AutomaticSpeechRecognitionPipeline's defaults
PIPELINE_NUM_BEAMS = 5
TASKS = ("transcribe", "translate")


@dataclass(frozen=True)
class SpeechModel:
    """What generation needs to know about a Whisper model, read once from its configs."""

    generation_config: object
    main_input_name: str
    num_mel_bins: int
    frames: int                  # input frames per segment (3000 for openai's checkpoints)
    max_target_positions: int
    decoder_start: int
    eos: int
    no_timestamps: int | None
    lang_to_id: dict
    task_to_id: dict
    set_params: dict             # the generation config's non-default values (what the pipeline sees as set)

    @classmethod
    def of(cls, model) -> SpeechModel | None:
        config = model.config
        if getattr(config, "model_type", "") != "whisper":
            return None
        gc = model.generation_config
        eos = gc.eos_token_id if gc.eos_token_id is not None else gc.bos_token_id
        if isinstance(eos, (list, tuple)):
            eos = eos[0]
        encoder = model.get_encoder()
        frames = config.max_source_positions * encoder.conv1.stride[0] * encoder.conv2.stride[0]
        return cls(generation_config=gc, main_input_name=model.main_input_name, num_mel_bins=config.num_mel_bins,
                   frames=frames, max_target_positions=config.max_target_positions,
                   decoder_start=gc.decoder_start_token_id, eos=eos,
                   no_timestamps=getattr(gc, "no_timestamps_token_id", None),
                   lang_to_id=dict(getattr(gc, "lang_to_id", None) or {}),
                   task_to_id=dict(getattr(gc, "task_to_id", None) or {}), set_params=gc.to_diff_dict())

    # ------------------------------------------------------------------ request checks

    def features(self, message) -> torch.Tensor:
        """A GenerateRequest's encoder_features as a [1, mel, frames] float32 tensor; InvalidArgument if not."""
        if message.name and message.name != self.main_input_name:
            raise InvalidArgument(f"encoder_features is named {message.name!r}; this model takes "
                                  f"{self.main_input_name!r}")
        want = [1, self.num_mel_bins, self.frames]
        if list(message.shape) != want:
            raise InvalidArgument(f"encoder_features has shape {list(message.shape)}; this model takes {want} "
                                  "(one segment of log-mel features, padded to its frames)")
        if len(message.data) != 4 * int(np.prod(want)):
            raise InvalidArgument(f"encoder_features holds {len(message.data)} bytes; shape {want} in float32 "
                                  f"takes {4 * int(np.prod(want))}")
        values = np.frombuffer(message.data, dtype="<f4").reshape(want)
        if not np.isfinite(values).all():
            raise InvalidArgument("encoder_features holds NaN or infinite values")
        return torch.from_numpy(values.copy())

    def language_id(self, language: str) -> int:
        from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

        if not self.lang_to_id:
            raise InvalidArgument("language is set but this model's generation config has no lang_to_id")
        name = language.lower()
        if name in self.lang_to_id:
            token = name
        elif name in TO_LANGUAGE_CODE:
            token = f"<|{TO_LANGUAGE_CODE[name]}|>"
        elif name in TO_LANGUAGE_CODE.values():
            token = f"<|{name}|>"
        else:
            raise InvalidArgument(f"unsupported language {language!r}")
        if token not in self.lang_to_id:
            raise InvalidArgument(f"language {language!r} ({token}) is not one of this model's languages: "
                                  f"{sorted(self.lang_to_id)}")
        return self.lang_to_id[token]

    def prompt(self, speech, config) -> list[int]:
        """The decoder prompt (init tokens) for a request's SpeechOptions; LANGUAGE_SLOT where the
        language is to be detected. Follows `_retrieve_init_tokens` step by step."""
        gc = self.generation_config
        language = speech.language if speech.HasField("language") else getattr(gc, "language", None)
        task = speech.task if speech.HasField("task") else getattr(gc, "task", None)
        if getattr(gc, "is_multilingual", None) is False and (language or task):
            raise InvalidArgument("language and task cannot be set for an English-only model")
        if task is not None and task not in TASKS:
            raise InvalidArgument(f"task must be one of {list(TASKS)}, got {task!r}")
        if task is not None and not self.task_to_id:
            raise InvalidArgument("task is set but this model's generation config has no task_to_id")
        if speech.return_timestamps and self.no_timestamps is None:
            raise InvalidArgument("return_timestamps needs a generation config with no_timestamps_token_id")
        tokens = [self.decoder_start]
        if task is None and language is None:
            forced = getattr(gc, "forced_decoder_ids", None) or getattr(config, "forced_decoder_ids", None)
            if forced and forced[0][0] == 1:
                position = 1
                while forced and forced[0][0] == position:
                    tokens.append(forced[0][1])
                    forced, position = forced[1:], position + 1
        language_undefined = len(tokens) <= 1 or tokens[1] is None
        lang_id = None
        if language is not None:
            lang_id = self.language_id(language)
        elif self.lang_to_id and language_undefined:
            lang_id = LANGUAGE_SLOT
        if lang_id is not None:
            if len(tokens) > 1:
                tokens[1] = lang_id
            else:
                tokens.append(lang_id)
        if task is not None:
            tokens.append(self.task_to_id[task])
        elif language is not None and self.task_to_id and not any(t in tokens for t in self.task_to_id.values()):
            tokens.append(self.task_to_id["transcribe"])
        if not speech.return_timestamps and self.no_timestamps is not None and tokens[-1] != self.no_timestamps:
            tokens.append(self.no_timestamps)
        elif speech.return_timestamps and tokens[-1] == self.no_timestamps:
            tokens = tokens[:-1]
        return [t for t in tokens if t is not None]

    def defaults(self, saved: dict, prompt_len: int) -> dict:
        """The generation defaults of a speech request: the pipeline's (num_beams 5, 256 new tokens) unless
        the model's generation config or MLflow's model_config set them; the config's max_length counts
        after the prompt, as generate counts it."""
        defaults = dict(saved)
        defaults.setdefault("num_beams", PIPELINE_NUM_BEAMS)
        if "max_new_tokens" not in defaults:
            max_length = self.set_params.get("max_length")
            if max_length is not None:
                total = min(max_length + min(self.max_target_positions // 2 - 1, prompt_len),
                            self.max_target_positions)
                defaults["max_new_tokens"] = max(1, total - prompt_len)
            else:
                defaults["max_new_tokens"] = PIPELINE_MAX_NEW_TOKENS
        return defaults

    # ------------------------------------------------------------------ the model side (worker thread)

    def detect_language(self, model, encoder_hidden: torch.Tensor) -> list[int]:
        """`detect_language`: the most likely language token after <|startoftranscript|>, per row."""
        from transformers.modeling_outputs import BaseModelOutput

        start = torch.full((encoder_hidden.shape[0], 1), self.decoder_start, dtype=torch.long,
                           device=encoder_hidden.device)
        logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden), decoder_input_ids=start,
                       use_cache=False).logits[:, -1]
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        keep[list(self.lang_to_id.values())] = True
        return logits.masked_fill(~keep, float("-inf")).argmax(-1).tolist()

    def fill_language(self, model, seqs, encoder_hidden: torch.Tensor) -> None:
        """Replace each prompt's LANGUAGE_SLOT by the language detected from its encoder states."""
        rows = [i for i, seq in enumerate(seqs) if LANGUAGE_SLOT in seq.prompt_ids]
        if not rows:
            return
        index = torch.tensor(rows, dtype=torch.long, device=encoder_hidden.device)
        for row, lang in zip(rows, self.detect_language(model, encoder_hidden.index_select(0, index)), strict=True):
            prompt = seqs[row].prompt_ids
            prompt[prompt.index(LANGUAGE_SLOT)] = lang

    def beam_search(self, model, seq, search, stopping_criteria) -> torch.Tensor:
        """One request's beam search as `generate_with_fallback` runs it: GenerationMixin.generate with
        the Whisper processors and the prompt as decoder_input_ids. Returns the output sequences."""
        from transformers import LogitsProcessorList
        from transformers.generation.utils import GenerationMixin

        device = next(model.parameters()).device
        features = seq.encoder_features.to(device, dtype=model.dtype)
        if LANGUAGE_SLOT in seq.prompt_ids:
            hidden = model.get_encoder()(features).last_hidden_state
            seq.prompt_ids[seq.prompt_ids.index(LANGUAGE_SLOT)] = self.detect_language(model, hidden)[0]
        p = seq.params
        gc = copy.deepcopy(self.generation_config)
        gc.update(num_beams=search.num_beams, max_new_tokens=p.max_new_tokens, min_new_tokens=p.min_new_tokens,
                  length_penalty=search.length_penalty, early_stopping=search.early_stopping,
                  no_repeat_ngram_size=search.no_repeat_ngram_size, repetition_penalty=p.repetition_penalty,
                  do_sample=False, suppress_tokens=None, begin_suppress_tokens=None,
                  eos_token_id=sorted(p.end_ids), return_dict_in_generate=True, output_scores=p.logprobs)
        prompt = torch.tensor([seq.prompt_ids], dtype=torch.long, device=device)
        processors = LogitsProcessorList(seq.speech.transformers_processors(len(seq.prompt_ids), device))
        return GenerationMixin.generate(model, features, generation_config=gc, logits_processor=processors,
                                        decoder_input_ids=prompt, stopping_criteria=stopping_criteria,
                                        suppress_tokens=None, begin_suppress_tokens=None)

    def request(self, speech) -> SpeechRequest:
        gc = self.generation_config
        return SpeechRequest(
            model=self, timestamps=bool(speech.return_timestamps),
            suppress=tuple(getattr(gc, "suppress_tokens", None) or ()),
            begin_suppress=tuple(getattr(gc, "begin_suppress_tokens", None) or ()),
            max_initial_timestamp_index=getattr(gc, "max_initial_timestamp_index", None),
            detect_timestamp_from_logprob=getattr(gc, "_detect_timestamp_from_logprob", True))


@dataclass(frozen=True)
class SpeechRequest:
    """One request's logits rules (the processors Whisper's generate adds), for the continuous batch."""

    model: SpeechModel
    timestamps: bool
    suppress: tuple
    begin_suppress: tuple
    max_initial_timestamp_index: int | None
    detect_timestamp_from_logprob: bool

    def process(self, logits: torch.Tensor, generated: list) -> torch.Tensor:
        """One row's scores [V] before the token is chosen; `generated`: the row's tokens after the prompt."""
        vocab = logits.shape[0]
        if not generated and self.begin_suppress:
            logits[[t for t in self.begin_suppress if t < vocab]] = float("-inf")
        if self.suppress:
            logits[[t for t in self.suppress if t < vocab]] = float("-inf")
        if self.timestamps:
            self._timestamp_rules(logits, generated)
        return logits

    def _timestamp_rules(self, logits: torch.Tensor, seq: list) -> None:
        """WhisperTimeStampLogitsProcessor on one row."""
        begin = self.model.no_timestamps + 1
        logits[self.model.no_timestamps] = float("-inf")
        last_was_timestamp = len(seq) >= 1 and seq[-1] >= begin
        penultimate_was_timestamp = len(seq) < 2 or seq[-2] >= begin
        if last_was_timestamp:
            if penultimate_was_timestamp:  # a pair is complete: text next
                logits[begin:] = float("-inf")
            else:  # the second of a pair (or eos)
                logits[: self.model.eos] = float("-inf")
        stamps = [t for t in seq if t >= begin]
        lowest = begin
        if stamps:
            lowest = stamps[-1] if last_was_timestamp and not penultimate_was_timestamp else stamps[-1] + 1
        logits[begin:lowest] = float("-inf")
        if not seq:
            logits[:begin] = float("-inf")
            if self.max_initial_timestamp_index is not None:
                logits[begin + self.max_initial_timestamp_index + 1:] = float("-inf")
        if self.detect_timestamp_from_logprob:
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            if logprobs[begin:].logsumexp(-1) > logprobs[:begin].max():
                logits[:begin] = float("-inf")

    def transformers_processors(self, begin_index: int, device) -> list:
        """The same rules as transformers' processors, in generate's order (for beam search)."""
        from transformers.generation.logits_process import (
            SuppressTokensAtBeginLogitsProcessor,
            SuppressTokensLogitsProcessor,
            WhisperTimeStampLogitsProcessor,
        )

        processors = []
        if self.begin_suppress:
            processors.append(SuppressTokensAtBeginLogitsProcessor(list(self.begin_suppress), begin_index,
                                                                   device=device))
        if self.suppress:
            processors.append(SuppressTokensLogitsProcessor(list(self.suppress), device=device))
        if self.timestamps:
            processors.append(WhisperTimeStampLogitsProcessor(self.model.generation_config, begin_index=begin_index))
        return processors
