"""splitserve.v1.Generation: streamed generation over the continuous-batching scheduler.

Plug-in of model_service.server: `register(server, runtime)` adds the servicer; the
scheduler is built once the model is loaded (calls before that get UNAVAILABLE).

`Generate` validates the request, queues a sequence and streams its tokens; tokens that
pile up while the client is slow go out together in one GenerateStep. When the caller goes
away (or preproc cancels on a stop string) the handler's `finally` cancels the sequence,
and the scheduler frees its slot at the next step. `Stats` shows the scheduler's state.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import yaml

from model_service.generation.batch import GenerationModel, Sequence
from model_service.generation.sampling import model_defaults, resolve
from model_service.generation.scheduler import Limits, Scheduler
from splitserve_common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable, grpc_errors
from splitserve_pb import generation_pb2 as pb
from splitserve_pb import generation_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
FINISH_REASONS = {"length": pb.FINISH_REASON_LENGTH, "eos": pb.FINISH_REASON_EOS, "stop": pb.FINISH_REASON_STOP}


def _last(event) -> bool:
    """An error or a sequence's final token: nothing follows it on the queue."""
    return isinstance(event, Exception) or bool(event.finish_reason)


def limits_from_args(args) -> Limits:
    return Limits(max_sequences=getattr(args, "gen_max_sequences", Limits.max_sequences),
                  max_tokens=getattr(args, "gen_max_tokens", Limits.max_tokens),
                  max_waiting=getattr(args, "gen_max_waiting", Limits.max_waiting))


def saved_defaults(source_dir: Path, weights_dir: Path) -> dict:
    """Generation defaults from the directory: MLmodel's model_config over generation_config.json."""
    gen_path = Path(weights_dir) / "generation_config.json"
    generation_config = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    model_config = {}
    mlmodel = Path(source_dir) / "MLmodel"
    if mlmodel.is_file():
        doc = yaml.safe_load(mlmodel.read_text()) or {}
        model_config = ((doc.get("flavors") or {}).get("python_function") or {}).get("config") or {}
    return model_defaults(generation_config, model_config)


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, runtime, limits: Limits = Limits(), stream_interval: int = 0):
        self.runtime = runtime
        self.limits = limits
        self.stream_interval = stream_interval  # 0: adapt to the load (see tokens_per_message)
        self.scheduler: Scheduler | None = None

    async def on_ready(self, runtime) -> None:
        """Build the scheduler around the loaded model (model_service's on-ready callback)."""
        engine, loaded = runtime.engine, runtime.engine.loaded
        self.engine = engine
        self.model_name = runtime.info.name if runtime.info is not None else ""
        self.can_generate = bool(getattr(loaded.model, "can_generate", lambda: False)())
        if self.can_generate and loaded.config.is_encoder_decoder and \
                loaded.special_ids.get("decoder_start_token_id") is None:
            log.warning("encoder-decoder model without decoder_start_token_id: generation is off")
            self.can_generate = False
        if not self.can_generate:
            # Generate answers FAILED_PRECONDITION and health says NOT_SERVING for this service;
            # the tensor API serves the model.
            runtime.not_serving.add(SERVICE_NAME)
            return
        self.gm = GenerationModel(loaded.model, loaded.pad_token_id,
                                  loaded.special_ids.get("decoder_start_token_id"))
        self.vocab_size = loaded.vocab_size
        self.max_positions = loaded.max_positions
        self.eos_ids = list(loaded.special_ids.get("eos_token_id") or [])
        self.defaults = saved_defaults(loaded.source_dir, loaded.weights_dir)
        self.scheduler = Scheduler(engine, self.gm, self.limits)

    def _ready(self) -> Scheduler:
        self.runtime.require()
        if self.scheduler is None:
            if getattr(self, "can_generate", None) is False:
                raise FailedPrecondition("the served model cannot generate text (no language-model head)")
            raise Unavailable("generation is still starting; wait for health SERVING")
        return self.scheduler

    def sequence_of(self, request) -> Sequence:
        """Check a GenerateRequest and turn it into a Sequence (raises InvalidArgument / NotFound)."""
        if request.model_name and self.model_name and request.model_name != self.model_name:
            raise NotFound(f"model '{request.model_name}' is not served here (this is '{self.model_name}')")
        if not request.input_ids:
            raise InvalidArgument("input_ids is empty: generation needs a prompt of at least one token")
        # Sizes first, before any work per id.
        if self.max_positions and len(request.input_ids) > self.max_positions:
            raise InvalidArgument(f"input of {len(request.input_ids)} tokens exceeds the model's "
                                  f"{self.max_positions} positions")
        stop_ids = request.settings.stop_token_ids
        if len(stop_ids) > self.vocab_size:
            raise InvalidArgument(f"{len(stop_ids)} stop_token_ids; the vocabulary has {self.vocab_size} tokens")
        ids = np.asarray(request.input_ids, dtype=np.int64)
        for name, values in (("input_ids", ids), ("stop_token_ids", np.asarray(stop_ids, dtype=np.int64))):
            bad = values[(values < 0) | (values >= self.vocab_size)]
            if bad.size:
                raise InvalidArgument(f"{name} holds ids outside the vocabulary [0, {self.vocab_size}): "
                                      f"{bad[:5].tolist()}")
        ids = ids.tolist()
        self.engine.adapters.check(request.adapter)
        if self.gm.is_encoder_decoder:
            prompt_len = 1  # the decoder starts from decoder_start_token_id
        else:
            prompt_len = len(ids)
        params = resolve(request.settings, self.defaults, prompt_len=prompt_len, context_len=self.max_positions,
                         eos_token_ids=self.eos_ids)
        return Sequence(request_id=request.id, prompt_ids=ids, params=params, adapter=request.adapter)

    @grpc_errors
    async def Generate(self, request, context):
        self._ready()
        seq = self.sequence_of(request)
        # The lease makes an adapter unload wait for this generation, and names the adapter meant.
        with self.engine.adapters.lease(request.adapter) as seq.adapter:
            async for step in self._stream(self.scheduler.submit(seq)):
                yield step

    def tokens_per_message(self) -> int:
        """With many streams, per-message overhead dominates: group tokens (about 1 per 4 streams)."""
        if self.stream_interval > 0:
            return self.stream_interval
        return min(8, max(1, self.scheduler.active_count // 4))

    async def _stream(self, seq: Sequence):
        """GenerateSteps of `seq`: the first token at once, then every `tokens_per_message()` tokens
        (or whatever piled up meanwhile), the last one with the finish reason."""
        try:
            finished, sent = False, 0
            while not finished:
                events = [await seq.events.get()]
                group = self.tokens_per_message() if sent else 1
                while not _last(events[-1]) and (not seq.events.empty() or len(events) < group):
                    events.append(await seq.events.get())
                step = pb.GenerateStep(prompt_tokens=len(seq.prompt_ids))
                for event in events:
                    if isinstance(event, Exception):
                        raise event
                    step.token_ids.append(event.token)
                    if seq.params.logprobs:
                        step.logprobs.append(event.logprob)
                    if event.finish_reason:
                        step.finish_reason = FINISH_REASONS[event.finish_reason]
                        finished = True
                sent += len(step.token_ids)
                step.generated_tokens = sent
                yield step
        finally:
            self.scheduler.cancel(seq)

    @grpc_errors
    async def Stats(self, request, context):
        scheduler = self._ready()
        limits = scheduler.limits
        return pb.GenerationStats(**scheduler.stats(), max_sequences=limits.max_sequences,
                                  max_tokens=limits.max_tokens)

    async def stop(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.stop()


def register(server, runtime) -> list[str]:
    """Plug-in hook of model_service.server: serve splitserve.v1.Generation."""
    servicer = GenerationServicer(runtime, limits_from_args(runtime.args),
                                  getattr(runtime.args, "gen_stream_interval", 0))
    generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    runtime.on_ready.append(servicer.on_ready)
    return [SERVICE_NAME]
