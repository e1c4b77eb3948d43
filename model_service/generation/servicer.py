"""splitserve.v1.Generation: streamed generation over the continuous-batching scheduler.

model_service.server adds the servicer before the server starts and calls `on_ready` once the
model is loaded; the scheduler is built then (calls before that get UNAVAILABLE).

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
from model_service.generation.beam import SearchRunner, resolve_search
from model_service.generation.sampling import model_defaults, resolve
from model_service.generation.scheduler import Limits, Scheduler
from splitserve_common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable, grpc_errors
from splitserve_pb import generation_pb2 as pb
from splitserve_pb import generation_pb2_grpc

log = logging.getLogger(__name__)

FINISH_REASONS = {"length": pb.FINISH_REASON_LENGTH, "eos": pb.FINISH_REASON_EOS, "stop": pb.FINISH_REASON_STOP}


def _last(event) -> bool:
    """An error or a sequence's final token: nothing follows it on the queue."""
    return isinstance(event, Exception) or bool(event.finish_reason)


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
    def __init__(self, runtime, limits: Limits = Limits(), stream_interval: int = 0, max_beams: int = 8,
                 torch_threads: int = 0, onednn_matmuls: bool = True, fused_gelu: bool = True, lanes: int = 1):
        self.runtime = runtime
        self.lanes = lanes  # decode batches stepping at once; 0: one per forward worker, 1: one batch
        self.onednn_matmuls = onednn_matmuls  # the batch's matrix products on oneDNN (CPU; matmuls.py)
        self.fused_gelu = fused_gelu  # the batch's NewGELUActivation as one operator (matmuls.py)
        self.limits = limits
        self.torch_threads = torch_threads  # of the generation steps; 0: chosen by measuring
        self.max_beams = max_beams
        self.searches: SearchRunner | None = None  # beam search / n-gram blocking, apart from the batch
        self.stream_interval = stream_interval  # 0: adapt to the load (see tokens_per_message)
        # Set by on_ready, once the model is loaded:
        self.engine = None
        self.model_name = ""
        self.can_generate = False
        self.gm: GenerationModel | None = None
        self.vocab_size = 0
        self.max_positions = 0
        self.eos_ids: list[int] = []
        self.defaults: dict = {}
        self.scheduler: Scheduler | None = None

    async def on_ready(self, runtime) -> None:
        """Build the scheduler around the loaded model (model_service.server calls it once loaded)."""
        engine, loaded = runtime.engine, runtime.engine.loaded
        self.engine = engine
        self.model_name = runtime.info.name
        self.can_generate = loaded.model.can_generate()
        if self.can_generate and loaded.config.is_encoder_decoder and \
                loaded.special_ids.get("decoder_start_token_id") is None:
            log.warning("encoder-decoder model without decoder_start_token_id: generation is off")
            self.can_generate = False
        if not self.can_generate:
            return  # Generate answers FAILED_PRECONDITION (health: NOT_SERVING); the tensor API serves the model
        self.gm = GenerationModel(loaded.model, loaded.pad_token_id,
                                  loaded.special_ids.get("decoder_start_token_id"))
        self.vocab_size = loaded.vocab_size
        self.max_positions = loaded.max_positions
        self.eos_ids = list(loaded.special_ids.get("eos_token_id") or [])
        self.defaults = saved_defaults(loaded.source_dir, loaded.weights_dir)
        self.scheduler = Scheduler(engine, self.gm, self.limits, self.torch_threads, self.onednn_matmuls,
                                   self.fused_gelu, self.lanes)
        self.searches = SearchRunner(engine, loaded.model, self.gm.is_encoder_decoder, self.gm.pad_token_id,
                                     self.limits.max_tokens, self.limits.max_waiting)

    def _ready(self) -> Scheduler:
        runtime = self.runtime.require()
        if self.scheduler is None:
            if runtime.is_ready and not self.can_generate:
                raise FailedPrecondition("the served model cannot generate text (no language-model head)")
            raise Unavailable("generation is still starting; wait for health SERVING")
        return self.scheduler

    def sequence_of(self, request) -> Sequence:
        """Check a GenerateRequest and turn it into a Sequence (raises InvalidArgument / NotFound)."""
        if request.model_name and request.model_name != self.model_name:
            raise NotFound(f"model '{request.model_name}' is not served here (this is '{self.model_name}')")
        speech = self.gm.speech
        if speech is None and (request.HasField("encoder_features") or request.HasField("speech")):
            raise InvalidArgument("encoder_features and speech are for speech models (Whisper); this model takes "
                                  "input_ids")
        if speech is not None and not request.HasField("encoder_features"):
            raise InvalidArgument(f"this speech model needs encoder_features ({speech.main_input_name} "
                                  f"[1, {speech.num_mel_bins}, {speech.frames}])")
        if not request.input_ids and speech is None:
            raise InvalidArgument("input_ids is empty: generation needs a prompt of at least one token")
        # Sizes first, before any work per id.
        max_positions = speech.max_target_positions if speech is not None else self.max_positions
        if max_positions and len(request.input_ids) > max_positions:
            raise InvalidArgument(f"input of {len(request.input_ids)} tokens exceeds the model's "
                                  f"{max_positions} positions")
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
        if speech is not None:
            features = speech.features(request.encoder_features)
            if not ids:
                ids = speech.prompt(request.speech, self.gm.model.config)
            params = resolve(request.settings, speech.defaults(self.defaults, len(ids)), prompt_len=len(ids),
                             context_len=speech.max_target_positions, eos_token_ids=self.eos_ids)
            refused = [name for name, on in (("do_sample", params.do_sample), ("presence_penalty",
                       params.presence_penalty), ("frequency_penalty", params.frequency_penalty)) if on]
            if refused:
                raise InvalidArgument(f"{', '.join(refused)} is not supported for speech models (Whisper's generate "
                                      "samples only through its temperature fallback)")
            return Sequence(request_id=request.id, prompt_ids=ids, params=params, adapter=request.adapter,
                            encoder_features=features, speech=speech.request(request.speech))
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
        defaults = self.defaults if seq.speech is None else self.gm.speech.defaults(self.defaults, len(seq.prompt_ids))
        search = resolve_search(request.settings, defaults, seq.params, self.max_beams)
        runner = self.scheduler if search is None else self.searches
        # The lease makes an adapter unload wait for this generation, and names the adapter meant.
        with self.engine.adapters.lease(request.adapter) as seq.adapter:
            submitted = runner.submit(seq) if search is None else runner.submit(seq, search)
            async for step in self._stream(submitted, runner):
                yield step

    def tokens_per_message(self) -> int:
        """With many streams, per-message overhead dominates: group tokens (about 1 per 4 streams)."""
        if self.stream_interval > 0:
            return self.stream_interval
        return min(8, max(1, self.scheduler.active_count // 4))

    async def _stream(self, seq: Sequence, runner):
        """GenerateSteps of `seq`: the first token at once, then every `tokens_per_message()` tokens
        (or whatever piled up meanwhile), the last one with the finish reason. `runner` (the
        scheduler or the search runner) is told when the caller goes away."""
        try:
            finished, sent = False, 0
            while not finished:
                events = [await seq.events.get()]
                group = self.tokens_per_message() if sent else 1
                while not _last(events[-1]) and (not seq.events.empty() or len(events) < group):
                    events.append(await seq.events.get())
                step = pb.GenerateStep(prompt_tokens=len(seq.prompt_ids))
                if seq.speech is not None and not sent:
                    step.decoder_prompt_ids.extend(seq.prompt_ids)  # with the detected language filled in
                for event in events:
                    if isinstance(event, Exception):
                        raise event
                    step.token_ids.append(event.token)
                    if seq.params.logprobs:
                        step.logprobs.append(event.logprob)
                    if seq.params.top_logprobs:
                        step.top_logprobs.add(token_ids=event.logprob.top_ids,
                                              logprobs=event.logprob.top_logprobs)
                    if event.finish_reason:
                        step.finish_reason = FINISH_REASONS[event.finish_reason]
                        finished = True
                sent += len(step.token_ids)
                step.generated_tokens = sent
                yield step
        finally:
            runner.cancel(seq)

    @grpc_errors
    async def Stats(self, request, context):
        scheduler = self._ready()
        limits = scheduler.limits
        return pb.GenerationStats(**scheduler.stats(), max_sequences=limits.max_sequences,
                                  max_tokens=limits.max_tokens)

    async def stop(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.stop()
