"""splitserve.v1.Preproc: typed requests -> task handlers -> typed answers.

Each encoder RPC turns its request into the task's inputs and explicit parameters, applies
MLflow's precedence (preproc_service/precedence.py) and runs the task module
(preproc_service/tasks); generation RPCs go to preproc_service/generation's GenerationHandlers.
Which RPCs a deployment answers follows from its task (splitserve_common/tasks.py).
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np

from preproc_service import tasks as task_handlers
from preproc_service.audio import AudioInput
from preproc_service.deployment import Deployment, RequestScope
from preproc_service.generation import GenerationHandlers
from preproc_service.precedence import as_json, explicit_fields
from preproc_service.served_models import resolve_model
from preproc_service.tasks import feature_extraction, speech_recognition, text_classification
from preproc_service.tokenization import EncodeOptions
from splitserve_common import tasks
from splitserve_common.errors import FailedPrecondition, InvalidArgument, grpc_errors, status_of
from splitserve_common.metrics import count_stream_item
from splitserve_common.streams import ordered_stream
from splitserve_common.v2_codec import to_preproc_tensor
from splitserve_pb import preproc_pb2 as pb
from splitserve_pb import preproc_pb2_grpc

_TOKENS_PER_SLICE = 20_000  # Tokenize: tokens put in the answer between two turns of the event loop

# The tasks each RPC can serve, from the registry (an RPC of another task is FAILED_PRECONDITION).
TASKS_OF_RPC: dict[str, list[str]] = {}
for _spec in tasks.TASKS.values():
    for _rpc in _spec.rpcs:
        TASKS_OF_RPC.setdefault(_rpc, []).append(_spec.name)


class PreprocServicer(preproc_pb2_grpc.PreprocServicer):
    def __init__(self, deployment: Deployment, generation: GenerationHandlers, stream_window: int = 64):
        self.dep = deployment
        self.generation = generation
        self.stream_window = stream_window
        # PredictStream dispatch: oneof field -> its handler.
        self._items = {
            "classify": self._classify,
            "classify_tokens": self._classify_tokens,
            "fill_mask": self._fill_mask,
            "answer_question": self._answer_question,
            "zero_shot_classify": self._zero_shot,
            "embed": self._embed,
        }

    # ------------------------------------------------------------ helpers

    def _begin(self, method: str, context, adapter: str = "") -> RequestScope:
        """The request's scope, once this deployment's task is one `method` serves."""
        self.dep.require_agreement()
        wanted, served = TASKS_OF_RPC[method], self.dep.task
        if served not in wanted:
            raise FailedPrecondition(f"{method} needs a {' or '.join(wanted)} model, but this deployment serves "
                                     f"{served or 'an unknown task'}")
        remaining = context.time_remaining() if context is not None else None
        return RequestScope(adapter=adapter, timeout=remaining)

    def _params(self, task: str, explicit: dict) -> dict:
        """The task's parameters after MLflow's precedence; `explicit`: what the request set."""
        return self.dep.precedence.resolve(tasks.TASKS[task].pipeline_defaults, explicit).values

    async def _run(self, task: str, scope: RequestScope, inputs, params: dict) -> tuple[object, dict]:
        """(the task's results, the parameters it applied) for one request."""
        applied_keys = list(params)
        results = await task_handlers.run(task, self.dep, scope, inputs, params)
        return results, {key: params[key] for key in applied_keys if key in params}

    @staticmethod
    def _meta(scope: RequestScope, applied: dict, started: float) -> pb.ResponseMeta:
        timings = dict(scope.timings_ms)
        timings["total"] = (time.perf_counter() - started) * 1e3
        return pb.ResponseMeta(applied_parameters=as_json(applied), timings_ms=timings)

    # ------------------------------------------------------------ encoder tasks

    async def _classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        started = time.perf_counter()
        scope = self._begin("Classify", context, request.adapter)
        inputs = text_classification.pair_inputs(list(request.texts), list(request.text_pairs))
        explicit = explicit_fields(request, ["function_to_apply", "top_k", "truncation", "all_labels"])
        params = self._params("text-classification", explicit)
        text_classification.every_label(explicit, params)
        results, applied = await self._run("text-classification", scope, inputs, params)
        return pb.ClassifyResponse(
            results=[pb.LabelScores(labels=[pb.LabelScore(**r) for r in row]) for row in results],
            meta=self._meta(scope, applied, started))

    async def _classify_tokens(self, request: pb.ClassifyTokensRequest, context) -> pb.ClassifyTokensResponse:
        started = time.perf_counter()
        scope = self._begin("ClassifyTokens", context, request.adapter)
        explicit = explicit_fields(request, ["aggregation_strategy", "truncation"])
        if request.HasField("ignore_labels"):
            explicit["ignore_labels"] = list(request.ignore_labels.values)
        results, applied = await self._run("token-classification", scope, list(request.texts),
                                           self._params("token-classification", explicit))
        return pb.ClassifyTokensResponse(
            results=[pb.Entities(entities=[_entity(e) for e in row]) for row in results],
            meta=self._meta(scope, applied, started))

    async def _fill_mask(self, request: pb.FillMaskRequest, context) -> pb.FillMaskResponse:
        started = time.perf_counter()
        scope = self._begin("FillMask", context, request.adapter)
        explicit = explicit_fields(request, ["top_k", "truncation", "targets"])
        results, applied = await self._run("fill-mask", scope, list(request.texts), self._params("fill-mask", explicit))
        return pb.FillMaskResponse(
            results=[pb.FillMaskResult(masks=[pb.MaskCandidates(candidates=[pb.MaskPrediction(**c) for c in mask])
                                              for mask in masks]) for masks in results],
            meta=self._meta(scope, applied, started))

    async def _answer_question(self, request: pb.AnswerQuestionRequest, context) -> pb.AnswerQuestionResponse:
        started = time.perf_counter()
        scope = self._begin("AnswerQuestion", context, request.adapter)
        inputs = [(item.question, item.context) for item in request.inputs]
        explicit = explicit_fields(request, ["top_k", "doc_stride", "max_answer_len", "max_seq_len", "max_question_len",
                                             "handle_impossible_answer", "align_to_words"])
        results, applied = await self._run("question-answering", scope, inputs,
                                           self._params("question-answering", explicit))
        return pb.AnswerQuestionResponse(
            results=[pb.Answers(answers=[pb.Answer(**a) for a in row]) for row in results],
            meta=self._meta(scope, applied, started))

    async def _zero_shot(self, request: pb.ZeroShotClassifyRequest, context) -> pb.ZeroShotClassifyResponse:
        started = time.perf_counter()
        scope = self._begin("ZeroShotClassify", context, request.adapter)
        explicit = explicit_fields(request, ["candidate_labels", "hypothesis_template", "multi_label"])
        results, applied = await self._run("zero-shot-classification", scope, list(request.texts),
                                           self._params("zero-shot-classification", explicit))
        return pb.ZeroShotClassifyResponse(results=[pb.ZeroShotResult(**r) for r in results],
                                           meta=self._meta(scope, applied, started))

    async def _embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        started = time.perf_counter()
        scope = self._begin("Embed", context, request.adapter)
        explicit = explicit_fields(request, ["pooling", "normalize", "float16", "truncation"])
        (vectors, prompt_tokens), applied = await self._run("feature-extraction", scope, list(request.texts),
                                                            self._params("feature-extraction", explicit))
        return pb.EmbedResponse(embeddings=[to_preproc_tensor(v) for v in vectors], prompt_tokens=prompt_tokens,
                                meta=self._meta(scope, applied, started))

    # The RPCs PredictStream serves too, where its items call the handlers above unwrapped (a failure is
    # that item's error, not the stream's).
    Classify = grpc_errors(_classify)
    ClassifyTokens = grpc_errors(_classify_tokens)
    FillMask = grpc_errors(_fill_mask)
    AnswerQuestion = grpc_errors(_answer_question)
    ZeroShotClassify = grpc_errors(_zero_shot)
    Embed = grpc_errors(_embed)

    @grpc_errors
    async def ClassifyAudio(self, request: pb.ClassifyAudioRequest, context) -> pb.ClassifyAudioResponse:
        started = time.perf_counter()
        scope = self._begin("ClassifyAudio", context, request.adapter)
        results, applied = await self._run("audio-classification", scope, _audio_inputs(request.inputs),
                                           self._params("audio-classification",
                                                        explicit_fields(request, ["top_k", "function_to_apply"])))
        return pb.ClassifyAudioResponse(
            results=[pb.LabelScores(labels=[pb.LabelScore(**r) for r in row]) for row in results],
            meta=self._meta(scope, applied, started))

    def _transcribe_params(self, request: pb.TranscribeRequest) -> dict:
        explicit = explicit_fields(request, ["chunk_length_s", "return_timestamps", "language", "task"])
        if request.stride_length_s:
            explicit["stride_length_s"] = list(request.stride_length_s)
        params = self._params("automatic-speech-recognition", explicit)
        kwargs = request.generate_kwargs
        params["generate_kwargs"] = explicit_fields(kwargs, [f.name for f in kwargs.DESCRIPTOR.fields])
        return params

    @grpc_errors
    async def AnswerTableQuestion(self, request: pb.TableQuestionRequest, context):
        started = time.perf_counter()
        scope = self._begin("AnswerTableQuestion", context, request.adapter)
        params = self._params("table-question-answering", explicit_fields(request, ["sequential", "truncation"]))
        items = [(item.table, list(item.queries)) for item in request.inputs]
        results, applied = await self._run("table-question-answering", scope, items, params)
        return pb.TableQuestionResponse(results=[pb.TableAnswers(answers=[_table_answer(a) for a in answers])
                                                 for answers in results],
                                        meta=self._meta(scope, applied, started))

    @grpc_errors
    async def Transcribe(self, request: pb.TranscribeRequest, context):
        started = time.perf_counter()
        scope = self._begin("Transcribe", context, request.adapter)
        results, applied = await self._run("automatic-speech-recognition", scope, _audio_inputs(request.inputs),
                                           self._transcribe_params(request))
        return pb.TranscribeResponse(results=[_transcription(r) for r in results],
                                     meta=self._meta(scope, applied, started))

    @grpc_errors
    async def TranscribeStream(self, request: pb.TranscribeRequest, context):
        """Transcribe's stages for one clip, its text sent as the chunks are recognised."""
        started = time.perf_counter()
        scope = self._begin("TranscribeStream", context, request.adapter)
        if len(request.inputs) != 1:
            raise InvalidArgument(f"TranscribeStream takes exactly one audio input, got {len(request.inputs)}")
        params = self._transcribe_params(request)
        async for piece in speech_recognition.transcribe_stream(self.dep, scope, _audio_inputs(request.inputs)[0],
                                                                params):
            if isinstance(piece, str):
                yield pb.TranscribeChunk(text=piece)
            else:
                yield pb.TranscribeChunk(result=_transcription(piece), meta=self._meta(scope, params, started))

    @grpc_errors
    async def Embeddings(self, request: pb.EmbeddingsRequest, context):
        """llm/v1/embeddings: pooled (sentence-transformers config, else mean) vectors in OpenAI's shape."""
        model, adapter = await resolve_model(self.dep, request.model, request.adapter)
        scope = self._begin("Embeddings", context, adapter)
        dimensions = request.dimensions if request.HasField("dimensions") else None
        if dimensions is not None:
            feature_extraction.check_dimensions(self.dep, dimensions)
        params = self._params("feature-extraction", {})
        if (params["pooling"] or self.dep.model_dir.pooling or "none") == "none":
            params["pooling"] = "mean"
        (vectors, prompt_tokens), applied = await self._run("feature-extraction", scope, list(request.input), params)
        vectors = [np.asarray(v, np.float32) for v in vectors]
        if dimensions is not None:
            vectors = feature_extraction.shorten(vectors, dimensions, applied["normalize"])
        return pb.EmbeddingsResponse(
            object="list",
            data=[pb.EmbeddingData(object="embedding", index=i, embedding=v.tolist()) for i, v in enumerate(vectors)],
            model=model,
            usage=pb.EmbeddingsUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens))

    # ------------------------------------------------------------ many items over one stream

    @grpc_errors
    async def PredictStream(self, request_iterator, context):
        """Results in input order; at most `stream_window` items in flight; stops when the caller leaves."""
        async def answer(item: pb.PredictRequest) -> pb.PredictResponse:
            response = await self._predict_item(item, context)
            response.id = item.id
            return response

        async for response in ordered_stream(request_iterator, answer, self.stream_window):
            yield response

    async def _predict_item(self, item: pb.PredictRequest, context) -> pb.PredictResponse:
        kind = item.WhichOneof("task")
        if kind is None:
            count_stream_item("PredictStream", grpc.StatusCode.INVALID_ARGUMENT.name)
            return pb.PredictResponse(error=pb.ItemError(code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                                         message="item has no task request"))
        try:
            result = await self._items[kind](getattr(item, kind), context)
        except Exception as exc:  # noqa: BLE001 - a bad item is answered, the stream goes on
            code, message = status_of(exc)
            count_stream_item(f"PredictStream.{kind}", code.name)
            return pb.PredictResponse(error=pb.ItemError(code=code.value[0], message=message))
        count_stream_item(f"PredictStream.{kind}", grpc.StatusCode.OK.name)
        return pb.PredictResponse(**{kind: result})

    # ------------------------------------------------------------ tokenizer and info

    @grpc_errors
    async def Tokenize(self, request: pb.TokenizeRequest, context):
        self.dep.require_agreement()
        if self.dep.tokenization is None:
            raise FailedPrecondition("Tokenize needs a fast (tokenizers-backed) tokenizer; this model has "
                                     + ("a slow one" if self.dep.tokenizer is not None else "none"))
        if request.texts:
            self.dep.limits.check_inputs(list(request.texts))
        if request.HasField("max_length") and request.max_length <= 0:
            raise InvalidArgument(f"max_length must be >= 1, got {request.max_length}")
        truncation = request.truncation if request.HasField("truncation") else False
        options = EncodeOptions(
            add_special_tokens=request.add_special_tokens if request.HasField("add_special_tokens") else True,
            max_length=(request.max_length or self.dep.max_length) if truncation else None)
        groups = await self.dep.tokenization.encode(list(request.texts), options)
        response, built = pb.TokenizeResponse(), 0
        for group in groups:
            enc = group[0]
            response.results.append(pb.Tokenized(ids=enc.ids, tokens=enc.tokens,
                                                 offsets=[pb.Offset(start=s, end=e) for s, e in enc.offsets]))
            built += len(enc.ids)
            if built >= _TOKENS_PER_SLICE:  # a large answer is built a slice at a time: other calls go on
                built = 0
                await asyncio.sleep(0)
        return response

    @grpc_errors
    async def Detokenize(self, request: pb.DetokenizeRequest, context):
        self.dep.require_agreement()
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        if self.dep.tokenizer is None:
            raise FailedPrecondition("this model has no tokenizer")
        vocab = len(self.dep.tokenizer)
        sequences = []
        for i, seq in enumerate(request.sequences):
            bad = [t for t in seq.ids if t < 0 or t >= vocab]
            if bad:
                raise InvalidArgument(f"sequence {i}: token ids {bad[:5]} outside the vocabulary [0, {vocab})")
            sequences.append(list(seq.ids))
        texts = self.dep.tokenizer.batch_decode(sequences, skip_special_tokens=skip)
        return pb.DetokenizeResponse(texts=texts)

    @grpc_errors
    async def Info(self, request, context):
        dep, info = self.dep, self.dep.info
        tokenizer = dep.tokenizer
        specials = {name: str(value) for name, value in getattr(tokenizer, "special_tokens_map", {}).items()
                    if isinstance(value, str)}
        return pb.InfoResponse(
            task=dep.task, inference_task=dep.model_dir.inference_task or (info.inference_task if info else ""),
            model_name=dep.model_name, model_type=info.model_type if info else "",
            labels=info.labels if info else [], max_length=dep.max_length,
            vocab_size=len(tokenizer) if tokenizer is not None else 0,
            tokenizer_class=type(tokenizer).__name__ if tokenizer is not None else "", special_tokens=specials,
            has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
            adapters=info.adapters if info else [], default_parameters=as_json(self._default_parameters()),
            model_service=dep.model.address)

    def _default_parameters(self) -> dict:
        task_spec = tasks.spec(self.dep.task)
        return self.dep.precedence.resolve(task_spec.pipeline_defaults).values if task_spec else {}

    # ------------------------------------------------------------ generation (preproc_service/generation)

    @grpc_errors
    async def GenerateText(self, request, context):
        return await self.generation.generate_text(request, self._begin("GenerateText", context, request.adapter))

    @grpc_errors
    async def Chat(self, request, context):
        return await self.generation.chat(request, self._begin("Chat", context, request.adapter))

    @grpc_errors
    async def Complete(self, request, context):
        return await self.generation.complete(request, self._begin("Complete", context, request.adapter))

    @grpc_errors
    async def GenerateTextStream(self, request, context):
        scope = self._begin("GenerateTextStream", context, request.adapter)
        async for chunk in self.generation.generate_text_stream(request, scope):
            yield chunk

    @grpc_errors
    async def ChatStream(self, request, context):
        async for chunk in self.generation.chat_stream(request, self._begin("ChatStream", context, request.adapter)):
            yield chunk

    @grpc_errors
    async def CompleteStream(self, request, context):
        scope = self._begin("CompleteStream", context, request.adapter)
        async for chunk in self.generation.complete_stream(request, scope):
            yield chunk


def _audio_inputs(inputs) -> list[AudioInput]:
    items = []
    for i, audio in enumerate(inputs):
        kind = audio.WhichOneof("source")
        if kind == "samples":
            raw = audio.samples.float32
            if len(raw) % 4:
                raise InvalidArgument(f"audio {i}: samples.float32 holds {len(raw)} bytes, not a whole number of "
                                      "float32 values")
            items.append(AudioInput(samples=np.frombuffer(raw, dtype="<f4"),
                                    sampling_rate=audio.samples.sampling_rate))
        elif kind == "data":
            items.append(AudioInput(data=audio.data))
        elif kind == "location":
            items.append(AudioInput(location=audio.location))
        else:
            raise InvalidArgument(f"audio {i} is empty: set data, samples or location")
    return items


def _table_answer(answer: dict) -> pb.TableAnswer:
    return pb.TableAnswer(answer=answer["answer"], cells=answer["cells"], aggregator=answer.get("aggregator", ""),
                          coordinates=[pb.CellCoordinate(row=int(r), column=int(c)) for r, c in answer["coordinates"]])


def _transcription(result: dict) -> pb.Transcription:
    return pb.Transcription(text=result["text"], chunks=[
        pb.TimedText(text=c["text"], **{key: float(value) for key, value in zip(("start", "end"), c["timestamp"],
                                                                              strict=True) if value is not None})
        for c in result.get("chunks", [])])


def _entity(e: dict) -> pb.Entity:
    entity = pb.Entity(score=e["score"], word=e["word"], start=int(e["start"]), end=int(e["end"]))
    if "entity" in e:
        entity.entity = e["entity"]
    if "entity_group" in e:
        entity.entity_group = e["entity_group"]
    if "index" in e:
        entity.index = int(e["index"])
    return entity
