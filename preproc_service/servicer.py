"""splitserve.v1.Preproc: typed requests -> task handlers -> typed answers.

Generation RPCs (GenerateText*, Chat*, Complete*) belong to preproc_service/generation:
its `GenerationHandlers(deployment)` answers them (methods in GENERATION_METHODS, called
with the request and a deployment.Call); without that package they are UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time

import grpc
import numpy as np

from preproc_service.deployment import Call, Deployment
from preproc_service.params import as_json, explicit_fields
from preproc_service.served_models import resolve_model
from preproc_service.tasks import (
    TASK_OF_METHOD,
    feature_extraction,
    fill_mask,
    question_answering,
    text_classification,
    token_classification,
    zero_shot_classification,
)
from preproc_service.tokenization import EncodeOptions
from splitserve_common.errors import FailedPrecondition, InvalidArgument, ServiceError, grpc_errors, status_of
from splitserve_common.metrics import count_stream_item
from splitserve_common.v2_codec import to_preproc_tensor
from splitserve_pb import preproc_pb2 as pb
from splitserve_pb import preproc_pb2_grpc

log = logging.getLogger(__name__)

# Generation RPC -> method of preproc_service.generation.GenerationHandlers, called as (request, Call).
GENERATION_METHODS = {"GenerateText": "generate_text", "GenerateTextStream": "generate_text_stream",
                      "Chat": "chat", "ChatStream": "chat_stream", "Complete": "complete",
                      "CompleteStream": "complete_stream"}


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED


def load_generation_handlers(deployment: Deployment, **options):
    """preproc_service.generation.GenerationHandlers(deployment, **options) when that package is present
    and sound (options: max_choices)."""
    try:
        module = importlib.import_module("preproc_service.generation")
        return module.GenerationHandlers(deployment, **options)
    except Exception:  # noqa: BLE001 - encoder tasks must keep serving without generation
        log.warning("generation handlers unavailable; GenerateText/Chat/Complete answer UNIMPLEMENTED",
                    exc_info=True)
        return None


class PreprocServicer(preproc_pb2_grpc.PreprocServicer):
    def __init__(self, deployment: Deployment, stream_window: int = 64, generation=None):
        self.dep = deployment
        self.stream_window = stream_window
        self.generation = generation
        # PredictStream dispatch: oneof field -> (handler, response field).
        self._items = {
            "classify": self._classify,
            "classify_tokens": self._classify_tokens,
            "fill_mask": self._fill_mask,
            "answer_question": self._answer_question,
            "zero_shot_classify": self._zero_shot,
            "embed": self._embed,
        }

    # ------------------------------------------------------------ helpers

    def _begin(self, method: str, context, adapter: str = "") -> Call:
        task = TASK_OF_METHOD[method]
        served = self.dep.task
        if served != task:
            raise FailedPrecondition(f"{method} needs a {task} model, but this deployment serves "
                                     f"{served or 'an unknown task'}")
        remaining = context.time_remaining() if context is not None else None
        return Call(adapter=adapter, timeout=remaining)

    @staticmethod
    def _meta(call: Call, applied: dict, started: float) -> pb.ResponseMeta:
        timings = dict(call.timings_ms)
        timings["total"] = (time.perf_counter() - started) * 1e3
        return pb.ResponseMeta(applied_parameters=as_json(applied), timings_ms=timings)

    # ------------------------------------------------------------ encoder tasks

    async def _classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        started = time.perf_counter()
        call = self._begin("Classify", context, request.adapter)
        explicit = explicit_fields(request, ["function_to_apply", "top_k", "truncation", "all_labels"])
        params = self.dep.params.resolve("text-classification", explicit)
        text_classification.every_label(explicit, params)
        results = await text_classification.run(self.dep, call, list(request.texts), list(request.text_pairs),
                                                 params)
        return pb.ClassifyResponse(
            results=[pb.LabelScores(labels=[pb.LabelScore(**r) for r in row]) for row in results],
            meta=self._meta(call, params, started))

    async def _classify_tokens(self, request: pb.ClassifyTokensRequest, context) -> pb.ClassifyTokensResponse:
        started = time.perf_counter()
        call = self._begin("ClassifyTokens", context, request.adapter)
        explicit = explicit_fields(request, ["aggregation_strategy", "truncation"])
        if request.HasField("ignore_labels"):
            explicit["ignore_labels"] = list(request.ignore_labels.values)
        params = self.dep.params.resolve("token-classification", explicit)
        results = await token_classification.run(self.dep, call, list(request.texts), params)
        return pb.ClassifyTokensResponse(
            results=[pb.Entities(entities=[_entity(e) for e in row]) for row in results],
            meta=self._meta(call, params, started))

    async def _fill_mask(self, request: pb.FillMaskRequest, context) -> pb.FillMaskResponse:
        started = time.perf_counter()
        call = self._begin("FillMask", context, request.adapter)
        explicit = explicit_fields(request, ["top_k", "truncation"])
        if request.targets:
            explicit["targets"] = list(request.targets)
        params = self.dep.params.resolve("fill-mask", explicit)
        results = await fill_mask.run(self.dep, call, list(request.texts), params)
        return pb.FillMaskResponse(
            results=[pb.FillMaskResult(masks=[pb.MaskCandidates(candidates=[pb.MaskPrediction(**c) for c in mask])
                                              for mask in masks]) for masks in results],
            meta=self._meta(call, params, started))

    async def _answer_question(self, request: pb.AnswerQuestionRequest, context) -> pb.AnswerQuestionResponse:
        started = time.perf_counter()
        call = self._begin("AnswerQuestion", context, request.adapter)
        params = self.dep.params.resolve("question-answering", explicit_fields(request, [
            "top_k", "doc_stride", "max_answer_len", "max_seq_len", "max_question_len", "handle_impossible_answer",
            "align_to_words"]))
        inputs = [(item.question, item.context) for item in request.inputs]
        results = await question_answering.run(self.dep, call, inputs, params)
        return pb.AnswerQuestionResponse(
            results=[pb.Answers(answers=[pb.Answer(**a) for a in row]) for row in results],
            meta=self._meta(call, params, started))

    async def _zero_shot(self, request: pb.ZeroShotClassifyRequest, context) -> pb.ZeroShotClassifyResponse:
        started = time.perf_counter()
        call = self._begin("ZeroShotClassify", context, request.adapter)
        params = self.dep.params.resolve("zero-shot-classification", explicit_fields(
            request, ["hypothesis_template", "multi_label"]))
        labels = list(request.candidate_labels) or params.get("candidate_labels") or []
        params["candidate_labels"] = zero_shot_classification.parse_labels(labels)
        results = await zero_shot_classification.run(self.dep, call, list(request.texts), labels, params)
        return pb.ZeroShotClassifyResponse(results=[pb.ZeroShotResult(**r) for r in results],
                                           meta=self._meta(call, params, started))

    async def _embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        started = time.perf_counter()
        call = self._begin("Embed", context, request.adapter)
        params = self.dep.params.resolve("feature-extraction", explicit_fields(
            request, ["pooling", "normalize", "float16", "truncation"]))
        vectors, prompt_tokens = await feature_extraction.run(self.dep, call, list(request.texts), params)
        return pb.EmbedResponse(embeddings=[to_preproc_tensor(v) for v in vectors], prompt_tokens=prompt_tokens,
                                meta=self._meta(call, params, started))

    @grpc_errors
    async def Classify(self, request, context):
        return await self._classify(request, context)

    @grpc_errors
    async def ClassifyTokens(self, request, context):
        return await self._classify_tokens(request, context)

    @grpc_errors
    async def FillMask(self, request, context):
        return await self._fill_mask(request, context)

    @grpc_errors
    async def AnswerQuestion(self, request, context):
        return await self._answer_question(request, context)

    @grpc_errors
    async def ZeroShotClassify(self, request, context):
        return await self._zero_shot(request, context)

    @grpc_errors
    async def Embed(self, request, context):
        return await self._embed(request, context)

    @grpc_errors
    async def Embeddings(self, request: pb.EmbeddingsRequest, context):
        """llm/v1/embeddings: pooled (sentence-transformers config, else mean) vectors in OpenAI's shape."""
        model, adapter = await resolve_model(self.dep, request.model, request.adapter)
        call = self._begin("Embeddings", context, adapter)
        params = self.dep.params.resolve("feature-extraction", {})
        if (params.get("pooling") or self.dep.model_dir.pooling or "none") == "none":
            params["pooling"] = "mean"
        dimensions = request.dimensions if request.HasField("dimensions") else None
        if dimensions is not None:
            feature_extraction.check_dimensions(self.dep, dimensions)
        vectors, prompt_tokens = await feature_extraction.run(self.dep, call, list(request.input), params)
        vectors = [np.asarray(v, np.float32) for v in vectors]
        if dimensions is not None:
            vectors = feature_extraction.shorten(vectors, dimensions, params["normalize"])
        return pb.EmbeddingsResponse(
            object="list",
            data=[pb.EmbeddingData(object="embedding", index=i, embedding=v.tolist()) for i, v in enumerate(vectors)],
            model=model,
            usage=pb.EmbeddingsUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens))

    # ------------------------------------------------------------ many items over one stream

    @grpc_errors
    async def PredictStream(self, request_iterator, context):
        """Results in input order; at most `stream_window` items in flight; stops when the caller leaves."""
        slots = asyncio.Semaphore(self.stream_window)
        pending: asyncio.Queue = asyncio.Queue()

        async def read():
            async for item in request_iterator:
                await slots.acquire()
                await pending.put((item.id, asyncio.ensure_future(self._predict_item(item, context))))
            await pending.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                getter = asyncio.ensure_future(pending.get())
                await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    reader.result()  # the request stream failed: raise its error
                    continue
                entry = getter.result()
                if entry is None:
                    break
                item_id, task = entry
                try:
                    response = await task
                finally:
                    slots.release()
                response.id = item_id
                yield response
        finally:
            reader.cancel()
            while not pending.empty():
                entry = pending.get_nowait()
                if entry is not None:
                    entry[1].cancel()

    async def _predict_item(self, item: pb.PredictRequest, context) -> pb.PredictResponse:
        kind = item.WhichOneof("task")
        if kind is None:
            count_stream_item("PredictStream", grpc.StatusCode.INVALID_ARGUMENT.name)
            return pb.PredictResponse(error=pb.ItemError(code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                                         message="item has no task request"))
        try:
            result = await self._items[kind](getattr(item, kind), context)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bad item is answered, the stream goes on
            code, message = status_of(exc)
            count_stream_item(f"PredictStream.{kind}", code.name)
            return pb.PredictResponse(error=pb.ItemError(code=code.value[0], message=message))
        count_stream_item(f"PredictStream.{kind}", grpc.StatusCode.OK.name)
        return pb.PredictResponse(**{kind: result})

    # ------------------------------------------------------------ tokenizer and info

    @grpc_errors
    async def Tokenize(self, request: pb.TokenizeRequest, context):
        if request.HasField("max_length") and request.max_length <= 0:
            raise InvalidArgument(f"max_length must be >= 1, got {request.max_length}")
        truncation = request.truncation if request.HasField("truncation") else False
        options = EncodeOptions(
            add_special_tokens=request.add_special_tokens if request.HasField("add_special_tokens") else True,
            max_length=(request.max_length or self.dep.max_length) if truncation else None)
        groups = await self.dep.tokenization.encode(list(request.texts), options)
        return pb.TokenizeResponse(results=[
            pb.Tokenized(ids=enc.ids, tokens=enc.tokens, offsets=[pb.Offset(start=s, end=e) for s, e in enc.offsets])
            for enc in (group[0] for group in groups)])

    @grpc_errors
    async def Detokenize(self, request: pb.DetokenizeRequest, context):
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
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
        specials = {name: str(value) for name, value in tokenizer.special_tokens_map.items() if isinstance(value, str)}
        return pb.InfoResponse(
            task=dep.task, inference_task=dep.model_dir.inference_task or (info.inference_task if info else ""),
            model_name=dep.model_name, model_type=info.model_type if info else "",
            labels=info.labels if info else [], max_length=dep.max_length, vocab_size=len(tokenizer),
            tokenizer_class=type(tokenizer).__name__, special_tokens=specials,
            has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
            adapters=info.adapters if info else [], default_parameters=as_json(dep.params.defaults(dep.task)),
            model_service=dep.model.address)

    # ------------------------------------------------------------ generation (delegated)

    def _generation(self, method: str, request, context):
        """(handler, Call) for a generation RPC, or UNIMPLEMENTED without generation handlers."""
        handler = getattr(self.generation, GENERATION_METHODS[method], None) if self.generation else None
        if handler is None:
            raise Unimplemented(f"{method} is not available: this preproc_service has no generation handlers")
        return handler, Call(adapter=getattr(request, "adapter", ""), timeout=context.time_remaining())

    @grpc_errors
    async def GenerateText(self, request, context):
        handler, call = self._generation("GenerateText", request, context)
        return await handler(request, call)

    @grpc_errors
    async def Chat(self, request, context):
        handler, call = self._generation("Chat", request, context)
        return await handler(request, call)

    @grpc_errors
    async def Complete(self, request, context):
        handler, call = self._generation("Complete", request, context)
        return await handler(request, call)

    @grpc_errors
    async def GenerateTextStream(self, request, context):
        handler, call = self._generation("GenerateTextStream", request, context)
        async for chunk in handler(request, call):
            yield chunk

    @grpc_errors
    async def ChatStream(self, request, context):
        handler, call = self._generation("ChatStream", request, context)
        async for chunk in handler(request, call):
            yield chunk

    @grpc_errors
    async def CompleteStream(self, request, context):
        handler, call = self._generation("CompleteStream", request, context)
        async for chunk in handler(request, call):
            yield chunk


def _entity(e: dict) -> pb.Entity:
    entity = pb.Entity(score=e["score"], word=e["word"], start=int(e["start"]), end=int(e["end"]))
    if "entity" in e:
        entity.entity = e["entity"]
    if "entity_group" in e:
        entity.entity_group = e["entity_group"]
    if "index" in e:
        entity.index = int(e["index"])
    return entity
