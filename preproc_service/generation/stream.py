"""One generation on model_service, turned into text pieces as its tokens arrive.

`generate_pieces` opens the Generation stream, detokenizes each step incrementally, cuts
at the first stop string (then cancels the model stream, so model_service frees the slot
at its next step) and ends with a piece that carries the finish reason and token counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from preproc_service.generation.detokenizer import IncrementalDetokenizer
from preproc_service.generation.text_filters import StopMatcher
from splitserve_common import call_context, metrics
from splitserve_common.errors import Unavailable, peer_errors
from splitserve_pb import generation_pb2 as gpb

# Model finish reasons -> OpenAI's: an eos or a stop token both end the answer naturally.
FINISH_REASONS = {gpb.FINISH_REASON_LENGTH: "length", gpb.FINISH_REASON_EOS: "stop", gpb.FINISH_REASON_STOP: "stop"}


@dataclass
class Piece:
    text: str
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)  # generation_pb2.TopLogprobs per token, when asked
    finish_reason: str = ""     # on the last piece: length | stop
    prompt_tokens: int = 0
    completion_tokens: int = 0  # tokens generated (so far)


async def generate_pieces(stub, request: gpb.GenerateRequest, tokenizer, *, context_ids=(), stops=(),
                          timeout: float | None = None, address: str = "model service"):
    detok = IncrementalDetokenizer(tokenizer, context_ids)
    matcher = StopMatcher(stops)
    model_stream = stub.Generate(request, timeout=timeout, metadata=call_context.outgoing_metadata())
    generated = 0
    seconds = {"hop": 0.0, "detokenize": 0.0}  # waiting for model_service's steps, turning them into text
    try:
        with peer_errors(address, "finish generating"):
            async for step in _timed(model_stream, seconds):
                started = time.perf_counter()
                ids, logprobs, tops = list(step.token_ids), list(step.logprobs), list(step.top_logprobs)
                if matcher.stops:  # token by token, so the answer and its count end at the stop string
                    text = ""
                    for k, token in enumerate(ids):
                        text += matcher.feed(detok.add([token]))
                        if matcher.stopped:
                            ids, logprobs, tops = ids[:k + 1], logprobs[:k + 1], tops[:k + 1]
                            break
                else:
                    text = detok.add(ids)
                generated += len(ids)
                last = step.finish_reason != gpb.FINISH_REASON_UNSPECIFIED
                if last and not matcher.stopped:
                    text += matcher.feed(detok.flush())
                    if not matcher.stopped:
                        text += matcher.flush()
                seconds["detokenize"] += time.perf_counter() - started
                piece = Piece(text, ids, logprobs, tops, prompt_tokens=step.prompt_tokens, completion_tokens=generated)
                if matcher.stopped:
                    piece.finish_reason = "stop"
                    yield piece
                    return
                if last:
                    piece.finish_reason = FINISH_REASONS.get(step.finish_reason, "stop")
                    yield piece
                    return
                yield piece
        raise Unavailable(f"{address} ended the generation stream without a finish reason")
    finally:
        # A stop string, an error or the caller going away: tell the model to stop generating.
        model_stream.cancel()
        for stage, spent in seconds.items():
            metrics.observe_stage(stage, spent)


async def _timed(model_stream, seconds: dict):
    """The stream's steps, adding the time spent waiting for each to seconds["hop"]."""
    steps = model_stream.__aiter__()
    while True:
        started = time.perf_counter()
        try:
            step = await steps.__anext__()
        except StopAsyncIteration:
            return
        finally:
            seconds["hop"] += time.perf_counter() - started
        yield step
