"""Beam search and n-gram blocking, run apart from the continuous batch.

The continuous batch (scheduler.py) picks one token per row per step; beam search keeps
num_beams hypotheses per request and reorders them every step, and no_repeat_ngram_size
looks at each row's whole history. A request that needs either is generated here instead:
by transformers' own `model.generate` on the engine's worker thread, one request per call,
so its tokens are exactly `model.generate(num_beams=..., ...)`'s. The whole answer is sent
when the search ends (a beam's tokens are not final before that). A search on the base model
runs on one of the engine's forward workers (`engine.run_forward`), so the continuous batch
keeps stepping on another meanwhile (with one forward worker, or adapter rows on either side,
they take turns): `--gen-max-beams` bounds the width, the model's context and `--gen-max-tokens`
bound its length.

What a request may combine (anything else is refused by name, never dropped):
- num_beams > 1 with length_penalty, early_stopping, no_repeat_ngram_size, min_new_tokens,
  repetition_penalty, stop ids; greedy only (beam sampling is refused), an end id needed (ignore_eos
  without stop ids is refused), no logprobs, no
  presence / frequency penalties (transformers' generate has none);
- num_beams 1 with no_repeat_ngram_size > 0: greedy decoding with n-gram blocking (logprobs and
  top_logprobs allowed); length_penalty and early_stopping set on a num_beams 1 request are refused;
- num_return_sequences 1 only: a request returns one sequence.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from model_service.adapters import BASE
from model_service.generation.batch import Sequence
from model_service.generation.sampling import ChosenLogprob, SamplingParams
from model_service.generation.scheduler import StepEvent
from splitserve_common.errors import InvalidArgument, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

SEARCH_KEYS = ("num_beams", "num_return_sequences", "length_penalty", "no_repeat_ngram_size", "early_stopping")
BEAM_ONLY = ("length_penalty", "early_stopping")


@dataclass(frozen=True)
class SearchParams:
    num_beams: int
    length_penalty: float
    early_stopping: bool
    no_repeat_ngram_size: int


def resolve_search(settings, defaults: dict, params: SamplingParams, max_beams: int) -> SearchParams | None:
    """The search a GenerateRequest's settings ask for (over the model's saved defaults), or None
    when the continuous batch serves it. Raises InvalidArgument naming what cannot be honoured."""

    def pick(name):
        return getattr(settings, name) if settings.HasField(name) else defaults.get(name)

    returns = pick("num_return_sequences")
    if returns is not None and int(returns) != 1:
        raise InvalidArgument(f"num_return_sequences={returns} is not supported: a request returns one sequence "
                              "(send one request per sequence)")
    num_beams = 1 if pick("num_beams") is None else int(pick("num_beams"))
    if not 1 <= num_beams <= max_beams:
        raise InvalidArgument(f"num_beams must be in [1, {max_beams}] (--gen-max-beams), got {num_beams}")
    no_repeat = int(pick("no_repeat_ngram_size") or 0)
    if no_repeat < 0:
        raise InvalidArgument(f"no_repeat_ngram_size must be >= 0 (0: off), got {no_repeat}")
    early_stopping = pick("early_stopping")
    if early_stopping is not None and not isinstance(early_stopping, bool):
        raise InvalidArgument(f"early_stopping={early_stopping!r} (from the model's generation config) is not "
                              "supported: only true or false")
    length_penalty = float(pick("length_penalty") if pick("length_penalty") is not None else 1.0)
    if num_beams == 1:
        asked = [key for key in BEAM_ONLY if settings.HasField(key)]
        if asked:
            raise InvalidArgument(f"{', '.join(asked)} applies to beam search only: set num_beams > 1")
        if not no_repeat:
            return None
    why = "num_beams > 1" if num_beams > 1 else "no_repeat_ngram_size"
    if params.do_sample:
        raise InvalidArgument(f"do_sample with {why} is not supported: beam search and n-gram blocking are greedy")
    penalties = [name for name in ("presence_penalty", "frequency_penalty") if getattr(params, name)]
    if penalties:
        raise InvalidArgument(f"{', '.join(penalties)} with {why} is not supported: transformers' generate has no "
                              "OpenAI penalties")
    if num_beams > 1 and not params.end_ids:
        # transformers' beam search needs an end id to finish hypotheses (an empty list fails inside it).
        raise InvalidArgument("ignore_eos with num_beams > 1 and no stop token ids is not supported: beam search "
                              "needs an end token; use num_beams 1 or give stop ids")
    if params.logprobs and num_beams > 1:
        raise InvalidArgument("logprobs with num_beams > 1 is not supported: a beam's tokens have no single "
                              "log-probability; use num_beams 1")
    return SearchParams(num_beams=num_beams, length_penalty=length_penalty, early_stopping=bool(early_stopping),
                        no_repeat_ngram_size=no_repeat)


class _Cancelled(StoppingCriteria):
    """Ends the search at the next step once the caller has gone."""

    def __init__(self, seq: Sequence):
        self.seq = seq

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.seq.cancelled, dtype=torch.bool, device=input_ids.device)


class SearchRunner:
    """Runs searches on the engine's worker, one request per call; events go to `seq.events`."""

    def __init__(self, engine, model, is_encoder_decoder: bool, pad_token_id: int, max_tokens: int,
                 max_waiting: int):
        self.engine = engine
        self.model = model
        self.is_encoder_decoder = is_encoder_decoder
        self.pad_token_id = pad_token_id
        self.max_tokens = max_tokens
        self.max_waiting = max_waiting
        self._tasks: set[asyncio.Task] = set()

    def submit(self, seq: Sequence, search: SearchParams) -> Sequence:
        reserved = seq.reserved_tokens * search.num_beams
        if reserved > self.max_tokens:
            raise ResourceExhausted(f"beam search needs {reserved} tokens ((prompt + max_new_tokens) x num_beams "
                                    f"{search.num_beams}), more than the limit of {self.max_tokens} (--gen-max-tokens)")
        if len(self._tasks) >= self.max_waiting:
            raise ResourceExhausted(f"beam search queue is full ({self.max_waiting} requests, --gen-max-waiting)")
        seq.events = asyncio.Queue()
        task = asyncio.get_running_loop().create_task(self._run(seq, search))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return seq

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True  # read by _Cancelled on the worker thread

    async def _run(self, seq: Sequence, search: SearchParams) -> None:
        try:
            run = self.engine.run_forward if seq.adapter in ("", BASE) else self.engine.run  # see scheduler.py
            tokens, logprobs = await run(self.generate, seq, search)
        except Exception as exc:  # noqa: BLE001 - fail this request, keep serving
            log.exception("beam search failed")
            seq.events.put_nowait(Unavailable(f"generation failed: {type(exc).__name__}: {exc}"))
            return
        p = seq.params
        last = tokens[-1] if tokens else None
        seq.finish_reason = "eos" if last in p.eos_token_ids else "stop" if last in p.stop_token_ids else "length"
        seq.generated = tokens
        for i, token in enumerate(tokens):
            seq.events.put_nowait(StepEvent(token, logprobs[i] if logprobs else None,
                                            seq.finish_reason if i == len(tokens) - 1 else ""))

    def generate(self, seq: Sequence, search: SearchParams) -> tuple[list[int], list[float]]:
        """Worker thread: model.generate for one request; its new tokens up to the first end id."""
        p = seq.params
        device = next(self.model.parameters()).device
        ids = torch.tensor([seq.prompt_ids], dtype=torch.long, device=device)
        stopping = StoppingCriteriaList([_Cancelled(seq)])
        with self.engine.adapters.use(seq.adapter):
            if seq.speech is not None:
                out = seq.speech.model.beam_search(self.model, seq, search, stopping)
            else:
                out = self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                    num_beams=search.num_beams, num_return_sequences=1, length_penalty=search.length_penalty,
                    early_stopping=search.early_stopping, no_repeat_ngram_size=search.no_repeat_ngram_size,
                    max_new_tokens=p.max_new_tokens, min_new_tokens=p.min_new_tokens,
                    repetition_penalty=p.repetition_penalty, eos_token_id=sorted(p.end_ids),
                    pad_token_id=self.pad_token_id, stopping_criteria=stopping,
                    output_scores=p.logprobs, return_dict_in_generate=True)
        # Encoder-decoder output starts with the decoder prompt: decoder_start_token_id, or a speech prompt.
        if seq.speech is not None:
            start = len(seq.prompt_ids)
        else:
            start = 1 if self.is_encoder_decoder else len(seq.prompt_ids)
        tokens = out.sequences[0, start:].tolist()
        ends = [i for i, token in enumerate(tokens) if token in p.end_ids]
        if ends:  # a finished beam is padded to the longest one
            tokens = tokens[: ends[0] + 1]
        # Greedy (num_beams 1): the processed scores of each step, as the continuous batch reports them.
        logprobs = [ChosenLogprob.of(out.scores[i][0].float().log_softmax(-1), token, p.top_logprobs)
                    for i, token in enumerate(tokens)] if p.logprobs else []
        return tokens, logprobs
