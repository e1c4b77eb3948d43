"""Generation settings: defaults, validation, and choosing the next token of each sequence.

Precedence of a setting (highest first), following shared/reference/mlflow-layout.md:
the request's GenerationSettings field > MLflow's saved model_config (MLmodel
`flavors.python_function.config`) > the model's generation_config.json > built-in
defaults. The built-ins are greedy decoding (do_sample false) with 256 new tokens at
most, clipped to the model's context; sampling knobs fall back to transformers' own
defaults (temperature 1.0, top_k 50, top_p 1.0, repetition_penalty 1.0).
preproc_service fills per-request params and MLflow signature defaults before calling.

Logits are processed in transformers' order: repetition penalty, OpenAI's presence and
frequency penalties (over the tokens generated so far), min_new_tokens (end ids suppressed),
then for sampling temperature, top-k, top-p. Log-probabilities, when asked for, are of the
distribution the token was chosen from (after that processing).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from splitserve_common.errors import InvalidArgument

# transformers' text-generation pipeline default.
DEFAULT_MAX_NEW_TOKENS = 256
SETTING_KEYS = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                "repetition_penalty", "num_beams", "num_return_sequences", "length_penalty", "no_repeat_ngram_size",
                "early_stopping")  # the last five: generation/beam.py
BUILT_IN = {"min_new_tokens": 0, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
            "repetition_penalty": 1.0}
MAX_TOP_LOGPROBS = 20  # OpenAI's bound


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    min_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    seed: int
    eos_token_ids: frozenset
    stop_token_ids: frozenset
    logprobs: bool
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_logprobs: int = 0

    @property
    def end_ids(self) -> frozenset:
        return self.eos_token_ids | self.stop_token_ids


def model_defaults(generation_config: dict, model_config: dict) -> dict:
    """The defaults for unset request fields: model_config over generation_config.json over built-ins."""
    defaults = dict(BUILT_IN)
    for source in (generation_config or {}, model_config or {}):
        for key in SETTING_KEYS:
            if source.get(key) is not None:
                defaults[key] = source[key]
    if "max_tokens" in (model_config or {}) and "max_new_tokens" not in model_config:
        defaults["max_new_tokens"] = model_config["max_tokens"]  # llm/v1 spelling
    return defaults


def resolve(settings, defaults: dict, *, prompt_len: int, context_len: int, eos_token_ids) -> SamplingParams:
    """Merge a GenerationSettings message over `defaults`; raise InvalidArgument on bad values.

    `context_len` is the most positions the sequence may occupy (prompt + new tokens for
    decoder-only models, new tokens for encoder-decoder ones); 0 means no fixed limit.
    """

    def pick(name):
        return getattr(settings, name) if settings.HasField(name) else defaults.get(name)

    room = context_len - prompt_len if context_len else None
    if room is not None and room <= 0:
        raise InvalidArgument(f"prompt of {prompt_len} tokens leaves no room in the model's context of "
                              f"{context_len} positions")
    if settings.HasField("max_new_tokens"):
        max_new = settings.max_new_tokens
        if max_new <= 0:
            raise InvalidArgument(f"max_new_tokens must be > 0, got {max_new}")
        if room is not None and max_new > room:
            raise InvalidArgument(f"max_new_tokens={max_new} with a prompt of {prompt_len} tokens exceeds the "
                                  f"model's context of {context_len} positions (at most {room} new tokens)")
    else:
        max_new = int(defaults.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        if room is not None:
            max_new = min(max_new, room)
    min_new = int(pick("min_new_tokens") or 0)
    if min_new < 0 or min_new > max_new:
        raise InvalidArgument(f"min_new_tokens must be in [0, max_new_tokens={max_new}], got {min_new}")
    temperature = finite("temperature", pick("temperature"))
    if temperature < 0:
        raise InvalidArgument(f"temperature must be >= 0, got {temperature}")
    top_p = finite("top_p", pick("top_p"))
    if not 0.0 < top_p <= 1.0:
        raise InvalidArgument(f"top_p must be in (0, 1], got {top_p}")
    top_k = int(pick("top_k"))
    if top_k < 0:
        raise InvalidArgument(f"top_k must be >= 0 (0 disables it), got {top_k}")
    penalty = finite("repetition_penalty", pick("repetition_penalty"))
    if penalty <= 0:
        raise InvalidArgument(f"repetition_penalty must be > 0, got {penalty}")
    presence, frequency = (settings.presence_penalty if settings.HasField("presence_penalty") else 0.0,
                           settings.frequency_penalty if settings.HasField("frequency_penalty") else 0.0)
    for name, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
        if not -2.0 <= value <= 2.0:
            raise InvalidArgument(f"{name} must be in [-2, 2], got {value}")
    if not 0 <= settings.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {settings.top_logprobs}")
    if settings.top_logprobs and not settings.logprobs:
        raise InvalidArgument("top_logprobs needs logprobs")
    # OpenAI semantics: temperature 0 means greedy.
    do_sample = bool(pick("do_sample")) and temperature > 0
    seed = settings.seed if settings.HasField("seed") else random.getrandbits(63)
    return SamplingParams(
        max_new_tokens=max_new, min_new_tokens=min_new, do_sample=do_sample, temperature=temperature,
        top_k=top_k, top_p=top_p, repetition_penalty=penalty, seed=seed,
        eos_token_ids=frozenset() if settings.ignore_eos else frozenset(eos_token_ids),
        stop_token_ids=frozenset(settings.stop_token_ids), logprobs=settings.logprobs,
        presence_penalty=presence, frequency_penalty=frequency, top_logprobs=settings.top_logprobs,
    )


def finite(name: str, value) -> float:
    """A float setting as float; NaN and infinities are refused (every comparison with NaN is false)."""
    value = float(value)
    if not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number, got {value}")
    return value


class ChosenLogprob(float):
    """A chosen token's log-probability that also carries the step's most likely alternatives
    (`top_ids`, `top_logprobs`, most likely first; empty unless top_logprobs was asked for)."""

    top_ids: tuple = ()
    top_logprobs: tuple = ()

    @classmethod
    def of(cls, log_probs: torch.Tensor, token: int, top: int) -> ChosenLogprob:
        chosen = cls(float(log_probs[token]))
        if top:
            values, ids = torch.topk(log_probs, min(top, log_probs.shape[0]))
            chosen.top_ids, chosen.top_logprobs = tuple(ids.tolist()), tuple(values.tolist())
        return chosen


class TokenChooser:
    """One sequence's sampler: it owns its random generator, so a seed gives the same tokens
    whatever else is in the batch."""

    def __init__(self, params: SamplingParams, device):
        self.params = params
        self.counts: dict[int, int] = {}  # generated token -> times (presence and frequency penalties)
        self.generator = None
        if params.do_sample:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        """Temperature, top-k, top-p over one row's scores [V] (sampling only)."""
        p = self.params
        if p.temperature != 1.0:
            logits = logits / p.temperature
        if 0 < p.top_k < logits.shape[0]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=False)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            remove = cumulative <= 1 - p.top_p
            remove[-1] = False  # keep at least one token
            logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
        return logits

    def sample(self, scores: torch.Tensor) -> int:
        return int(torch.multinomial(scores.softmax(-1), 1, generator=self.generator))


    def penalize_generated(self, logits: torch.Tensor) -> torch.Tensor:
        """OpenAI's presence and frequency penalties over this sequence's generated tokens, one row [V]."""
        p = self.params
        if not self.counts or (p.presence_penalty == 0.0 and p.frequency_penalty == 0.0):
            return logits
        ids = [i for i in self.counts if i < logits.shape[0]]
        counts = torch.tensor([self.counts[i] for i in ids], dtype=logits.dtype, device=logits.device)
        index = torch.tensor(ids, dtype=torch.long, device=logits.device)
        return logits.index_add(0, index, -(counts * p.frequency_penalty + p.presence_penalty))

    def record(self, token: int) -> None:
        self.counts[token] = self.counts.get(token, 0) + 1


def penalize(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty on one row: seen tokens' scores divided (or, if negative, multiplied)."""
    picked = logits.gather(0, seen_ids)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(0, seen_ids, picked)


def choose_tokens(logits: torch.Tensor, choosers, seen_ids, generated_counts, processors=None):
    """Next token (and its log-probability, or None) for every row of `logits` [B, V].

    Penalties and min_new_tokens apply per row where asked, then a row's own processor (a model's
    rules such as Whisper's, `processors[row](scores) -> scores`, None for none); greedy rows then
    share one argmax, sampling rows draw from their own generator.
    """
    logits = logits.float().clone()
    vocab = logits.shape[1]
    rows, cols = [], []
    for row, chooser in enumerate(choosers):
        p = chooser.params
        if p.repetition_penalty != 1.0 and seen_ids[row] is not None and seen_ids[row].numel():
            logits[row] = penalize(logits[row], seen_ids[row], p.repetition_penalty)
        logits[row] = chooser.penalize_generated(logits[row])
        if generated_counts[row] < p.min_new_tokens:
            ends = [i for i in p.end_ids if i < vocab]
            rows += [row] * len(ends)
            cols += ends
    if rows:
        logits[rows, cols] = float("-inf")
    for row, process in enumerate(processors or ()):
        if process is not None:
            logits[row] = process(logits[row])
    greedy = logits.argmax(-1).tolist()
    log_probs = None
    if any(c.params.logprobs and not c.params.do_sample for c in choosers):
        log_probs = logits.log_softmax(-1)
    results = []
    for row, chooser in enumerate(choosers):
        p = chooser.params
        if not p.do_sample:
            token = greedy[row]
            results.append((token, ChosenLogprob.of(log_probs[row], token, p.top_logprobs) if p.logprobs else None))
        else:
            scores = chooser.warp(logits[row])
            token = chooser.sample(scores)
            results.append((token, ChosenLogprob.of(scores.log_softmax(-1), token, p.top_logprobs)
                            if p.logprobs else None))
        chooser.record(token)
    return results
