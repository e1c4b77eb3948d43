"""Python clients for preproc_service: `PreprocClient` (blocking) and `AsyncPreprocClient` (asyncio).

Both take plain Python values and return typed results; every list of results is a `Results`
(a list) that also carries what the service applied (`applied_parameters`) and its timings.
Errors arrive as grpc.RpcError / grpc.aio.AioRpcError with the service's status and message.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass, field

import grpc
import numpy as np

from client.channel_client import AsyncChannelClient, ChannelClient
from splitserve_common.call_context import REQUEST_ID_KEY
from splitserve_common.v2_codec import from_preproc_tensor
from splitserve_pb import preproc_pb2 as pb
from splitserve_pb import preproc_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:8011"


class Results(list):
    """A list of per-input results plus the response's meta."""

    def __init__(self, items=(), meta: pb.ResponseMeta | None = None):
        super().__init__(items)
        self.applied_parameters = {k: json.loads(v) for k, v in meta.applied_parameters.items()} if meta else {}
        self.timings_ms = dict(meta.timings_ms) if meta else {}


@dataclass
class LabelScore:
    label: str
    score: float


@dataclass
class Entity:
    score: float
    word: str
    start: int
    end: int
    entity: str | None = None        # aggregation none
    entity_group: str | None = None  # other aggregations
    index: int | None = None


@dataclass
class MaskPrediction:
    score: float
    token: int
    token_str: str
    sequence: str


@dataclass
class Answer:
    score: float
    start: int
    end: int
    answer: str


@dataclass
class ZeroShotResult:
    sequence: str
    labels: list[str]
    scores: list[float]


@dataclass
class Tokenized:
    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]


@dataclass
class Info:
    task: str
    inference_task: str
    model_name: str
    model_type: str
    labels: list[str]
    max_length: int
    vocab_size: int
    tokenizer_class: str
    special_tokens: dict[str, str]
    has_chat_template: bool
    adapters: list[str]
    default_parameters: dict = field(default_factory=dict)
    model_service: str = ""


# ---------------------------------------------------------------- requests and replies (shared)

def _opt(**values) -> dict:
    return {k: v for k, v in values.items() if v is not None}


def classify_request(texts, text_pairs=None, *, top_k=None, all_labels=None, function_to_apply=None,
                     truncation=None, adapter=""):
    """top_k: that many labels per text (unset: the best one); all_labels=True: every label, sorted
    (the pipeline's explicit top_k=None)."""
    return pb.ClassifyRequest(texts=_texts(texts), text_pairs=_texts(text_pairs or []), adapter=adapter,
                              **_opt(top_k=top_k, all_labels=all_labels, function_to_apply=function_to_apply,
                                     truncation=truncation))


def classify_tokens_request(texts, *, aggregation_strategy=None, ignore_labels=None, truncation=None, adapter=""):
    request = pb.ClassifyTokensRequest(texts=_texts(texts), adapter=adapter,
                                       **_opt(aggregation_strategy=aggregation_strategy, truncation=truncation))
    if ignore_labels is not None:
        request.ignore_labels.SetInParent()
        request.ignore_labels.values.extend(ignore_labels)
    return request


def fill_mask_request(texts, *, top_k=None, targets=None, truncation=None, adapter=""):
    return pb.FillMaskRequest(texts=_texts(texts), targets=_texts(targets or []), adapter=adapter,
                              **_opt(top_k=top_k, truncation=truncation))


def answer_question_request(inputs, *, top_k=None, doc_stride=None, max_answer_len=None, max_seq_len=None,
                            max_question_len=None, handle_impossible_answer=None, align_to_words=None, adapter=""):
    """`inputs`: (question, context) pairs or {"question": ..., "context": ...} dicts."""
    pairs = [pb.QuestionContext(question=i["question"], context=i["context"]) if isinstance(i, dict)
             else pb.QuestionContext(question=i[0], context=i[1]) for i in inputs]
    return pb.AnswerQuestionRequest(inputs=pairs, adapter=adapter, **_opt(
        top_k=top_k, doc_stride=doc_stride, max_answer_len=max_answer_len, max_seq_len=max_seq_len,
        max_question_len=max_question_len, handle_impossible_answer=handle_impossible_answer,
        align_to_words=align_to_words))


def zero_shot_request(texts, candidate_labels, *, hypothesis_template=None, multi_label=None, adapter=""):
    return pb.ZeroShotClassifyRequest(texts=_texts(texts), candidate_labels=_texts(candidate_labels or []),
                                      adapter=adapter,
                                      **_opt(hypothesis_template=hypothesis_template, multi_label=multi_label))


def embed_request(texts, *, pooling=None, normalize=None, float16=None, truncation=None, adapter=""):
    return pb.EmbedRequest(texts=_texts(texts), adapter=adapter,
                           **_opt(pooling=pooling, normalize=normalize, float16=float16, truncation=truncation))


def audio_message(item) -> pb.Audio:
    """One clip: bytes of an audio file, (samples, sampling_rate), {"raw"|"array": samples,
    "sampling_rate": rate} (the pipelines' dict), or a str location under the server's --audio-root."""
    if isinstance(item, pb.Audio):
        return item
    if isinstance(item, (bytes, bytearray)):
        return pb.Audio(data=bytes(item))
    if isinstance(item, str):
        return pb.Audio(location=item)
    if isinstance(item, dict):
        samples = item.get("raw", item.get("array"))
        item = (samples, item["sampling_rate"])
    samples, rate = item
    data = np.ascontiguousarray(np.asarray(samples, dtype="<f4")).tobytes()
    return pb.Audio(samples=pb.AudioSamples(float32=data, sampling_rate=int(rate)))


def _audios(inputs) -> list[pb.Audio]:
    single = isinstance(inputs, (bytes, bytearray, str, dict, tuple, pb.Audio))
    return [audio_message(i) for i in ([inputs] if single else inputs)]


def classify_audio_request(inputs, *, top_k=None, function_to_apply=None, adapter=""):
    return pb.ClassifyAudioRequest(inputs=_audios(inputs), adapter=adapter,
                                   **_opt(top_k=top_k, function_to_apply=function_to_apply))


def transcribe_request(inputs, *, chunk_length_s=None, stride_length_s=None, return_timestamps=None, language=None,
                       task=None, generate_kwargs=None, adapter=""):
    """return_timestamps: "char" / "word" (CTC) or True (Whisper's segments); language, task and
    generate_kwargs (a dict of GenerateTextParameters fields, e.g. max_new_tokens, num_beams): Whisper."""
    if isinstance(stride_length_s, (int, float)):
        stride_length_s = [stride_length_s]
    if return_timestamps is True:
        return_timestamps = "true"
    elif return_timestamps is False:
        return_timestamps = None
    return pb.TranscribeRequest(inputs=_audios(inputs), stride_length_s=list(stride_length_s or []), adapter=adapter,
                                generate_kwargs=pb.GenerateTextParameters(**(generate_kwargs or {})),
                                **_opt(chunk_length_s=chunk_length_s, return_timestamps=return_timestamps,
                                       language=language, task=task))


def table_question_request(inputs, *, sequential=None, truncation=None, adapter=""):
    """`inputs`: (table, queries) pairs or {"table": ..., "query": ...} dicts (MLflow's shape); a table is
    a dict of columns, a list of row dicts or its JSON text; queries one str or a list."""
    items = []
    for item in inputs:
        table, queries = (item["table"], item["query"]) if isinstance(item, dict) else item
        items.append(pb.TableQuery(table=table if isinstance(table, str) else json.dumps(table),
                                   queries=[queries] if isinstance(queries, str) else list(queries)))
    return pb.TableQuestionRequest(inputs=items, adapter=adapter, **_opt(sequential=sequential, truncation=truncation))


@dataclass
class TableAnswer:
    answer: str
    coordinates: list[tuple[int, int]]
    cells: list[str]
    aggregator: str = ""


def parse_table_answers(reply: pb.TableQuestionResponse) -> Results:
    """Per table, one TableAnswer per query."""
    return Results([[TableAnswer(a.answer, [(c.row, c.column) for c in a.coordinates], list(a.cells), a.aggregator)
                     for a in row.answers] for row in reply.results], reply.meta)


@dataclass
class Transcription:
    text: str
    chunks: list[dict] = field(default_factory=list)  # {"text", "timestamp": (start, end)} with return_timestamps


def _transcription(t: pb.Transcription) -> Transcription:
    return Transcription(t.text, [{"text": c.text, "timestamp": (c.start if c.HasField("start") else None,
                                                                  c.end if c.HasField("end") else None)}
                                  for c in t.chunks])


def parse_transcribe(reply: pb.TranscribeResponse) -> Results:
    return Results([_transcription(t) for t in reply.results], reply.meta)


def _texts(texts) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def parse_classify(reply: pb.ClassifyResponse) -> Results:
    return Results([[LabelScore(x.label, x.score) for x in row.labels] for row in reply.results], reply.meta)


def _parse_entity(e: pb.Entity) -> Entity:
    return Entity(score=e.score, word=e.word, start=e.start, end=e.end, entity=e.entity or None,
                  entity_group=e.entity_group or None, index=e.index if e.HasField("index") else None)


def parse_classify_tokens(reply: pb.ClassifyTokensResponse) -> Results:
    return Results([[_parse_entity(e) for e in row.entities] for row in reply.results], reply.meta)


def parse_fill_mask(reply: pb.FillMaskResponse) -> Results:
    """Per text, one list of candidates per mask token."""
    return Results([[[MaskPrediction(c.score, c.token, c.token_str, c.sequence) for c in mask.candidates]
                     for mask in result.masks] for result in reply.results], reply.meta)


def parse_answers(reply: pb.AnswerQuestionResponse) -> Results:
    return Results([[Answer(a.score, a.start, a.end, a.answer) for a in row.answers] for row in reply.results],
                   reply.meta)


def parse_zero_shot(reply: pb.ZeroShotClassifyResponse) -> Results:
    return Results([ZeroShotResult(r.sequence, list(r.labels), list(r.scores)) for r in reply.results], reply.meta)


def parse_embed(reply: pb.EmbedResponse) -> Results:
    results = Results([from_preproc_tensor(t) for t in reply.embeddings], reply.meta)
    results.prompt_tokens = reply.prompt_tokens
    return results


def parse_tokenize(reply: pb.TokenizeResponse) -> list[Tokenized]:
    return [Tokenized(list(r.ids), list(r.tokens), [(o.start, o.end) for o in r.offsets]) for r in reply.results]


def parse_info(reply: pb.InfoResponse) -> Info:
    return Info(task=reply.task, inference_task=reply.inference_task, model_name=reply.model_name,
                model_type=reply.model_type, labels=list(reply.labels), max_length=reply.max_length,
                vocab_size=reply.vocab_size, tokenizer_class=reply.tokenizer_class,
                special_tokens=dict(reply.special_tokens), has_chat_template=reply.has_chat_template,
                adapters=list(reply.adapters),
                default_parameters={k: json.loads(v) for k, v in reply.default_parameters.items()},
                model_service=reply.model_service)


def tokenize_request(texts, *, add_special_tokens=None, truncation=None, max_length=None):
    return pb.TokenizeRequest(texts=_texts(texts), **_opt(add_special_tokens=add_special_tokens,
                                                           truncation=truncation, max_length=max_length))


def detokenize_request(sequences, *, skip_special_tokens=None):
    return pb.DetokenizeRequest(sequences=[pb.TokenIds(ids=list(s)) for s in sequences],
                                **_opt(skip_special_tokens=skip_special_tokens))


# method name -> (request builder, stub method, reply parser)
_CALLS = {
    "classify": (classify_request, "Classify", parse_classify),
    "classify_tokens": (classify_tokens_request, "ClassifyTokens", parse_classify_tokens),
    "fill_mask": (fill_mask_request, "FillMask", parse_fill_mask),
    "answer_question": (answer_question_request, "AnswerQuestion", parse_answers),
    "zero_shot_classify": (zero_shot_request, "ZeroShotClassify", parse_zero_shot),
    "embed": (embed_request, "Embed", parse_embed),
    "tokenize": (tokenize_request, "Tokenize", parse_tokenize),
    "detokenize": (detokenize_request, "Detokenize", lambda reply: list(reply.texts)),
    "classify_audio": (classify_audio_request, "ClassifyAudio", parse_classify),
    "transcribe": (transcribe_request, "Transcribe", parse_transcribe),
    "answer_table_question": (table_question_request, "AnswerTableQuestion", parse_table_answers),
}


def _request_id():
    """Each call's own request id (both services log it; preproc passes it on to model_service). A service
    sends back only an id it made up itself, as initial metadata of its own before the answer: one more
    frame per call (paired at concurrency 1 on the shared 2-core machine: 0.34 ms per call; issue 13)."""
    return ((REQUEST_ID_KEY, uuid.uuid4().hex),)


def _channel_options(max_message_mb: int = 64):
    limit = max_message_mb * 1024 * 1024
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


# ---------------------------------------------------------------- blocking client

class PreprocClient(ChannelClient):
    """Blocking client. `timeout` (seconds) is each call's deadline, passed on to the model service."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float | None = 30.0,
                 channel: grpc.Channel | None = None):
        self.address = address
        self.timeout = timeout
        self.channel = channel or grpc.insecure_channel(address, options=_channel_options())
        self.stub = preproc_pb2_grpc.PreprocStub(self.channel)

    def _call(self, name, *args, **kwargs):
        build, method, parse = _CALLS[name]
        return parse(getattr(self.stub, method)(build(*args, **kwargs), timeout=self.timeout, metadata=_request_id()))

    def classify(self, texts, text_pairs=None, **options) -> Results:
        return self._call("classify", texts, text_pairs, **options)

    def classify_tokens(self, texts, **options) -> Results:
        return self._call("classify_tokens", texts, **options)

    def fill_mask(self, texts, **options) -> Results:
        return self._call("fill_mask", texts, **options)

    def answer_question(self, inputs, **options) -> Results:
        return self._call("answer_question", inputs, **options)

    def zero_shot_classify(self, texts, candidate_labels, **options) -> Results:
        return self._call("zero_shot_classify", texts, candidate_labels, **options)

    def embed(self, texts, **options) -> Results:
        return self._call("embed", texts, **options)

    def tokenize(self, texts, **options) -> list[Tokenized]:
        return self._call("tokenize", texts, **options)

    def detokenize(self, sequences, **options) -> list[str]:
        return self._call("detokenize", sequences, **options)

    def info(self) -> Info:
        return parse_info(self.stub.Info(pb.InfoRequest(), timeout=self.timeout))

    def answer_table_question(self, inputs, **options) -> Results:
        """table-question-answering: per (table, queries) input, one TableAnswer per query."""
        return self._call("answer_table_question", inputs, **options)

    def classify_audio(self, inputs, **options) -> Results:
        """audio-classification: one list of LabelScore per clip (see audio_message for the inputs)."""
        return self._call("classify_audio", inputs, **options)

    def transcribe(self, inputs, **options) -> Results:
        """automatic-speech-recognition: one Transcription per clip."""
        return self._call("transcribe", inputs, **options)

    def transcribe_stream(self, audio, **options) -> Iterable[str | Transcription]:
        """Text pieces as they are recognised, then the whole Transcription."""
        for chunk in self.stub.TranscribeStream(transcribe_request([audio_message(audio)], **options),
                                                timeout=self.timeout):
            yield _transcription(chunk.result) if chunk.HasField("result") else chunk.text

    def embeddings(self, inputs, model: str = "", adapter: str = "") -> dict:
        """llm/v1/embeddings as OpenAI's JSON shape."""
        reply = self.stub.Embeddings(pb.EmbeddingsRequest(input=_texts(inputs), model=model, adapter=adapter),
                                     timeout=self.timeout)
        return _embeddings_dict(reply)

    def predict_stream(self, requests: Iterable[pb.PredictRequest]) -> Iterable[pb.PredictResponse]:
        """Many task requests over one call; responses come back in input order."""
        return self.stub.PredictStream(iter(requests), timeout=self.timeout)


# ---------------------------------------------------------------- asyncio client

class AsyncPreprocClient(AsyncChannelClient):
    """asyncio client with the same methods as PreprocClient, as coroutines."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float | None = 30.0,
                 channel: grpc.aio.Channel | None = None):
        self.address = address
        self.timeout = timeout
        self.channel = channel or grpc.aio.insecure_channel(address, options=_channel_options())
        self.stub = preproc_pb2_grpc.PreprocStub(self.channel)

    async def _call(self, name, *args, **kwargs):
        build, method, parse = _CALLS[name]
        return parse(await getattr(self.stub, method)(build(*args, **kwargs), timeout=self.timeout,
                                                      metadata=_request_id()))

    async def classify(self, texts, text_pairs=None, **options) -> Results:
        return await self._call("classify", texts, text_pairs, **options)

    async def classify_tokens(self, texts, **options) -> Results:
        return await self._call("classify_tokens", texts, **options)

    async def fill_mask(self, texts, **options) -> Results:
        return await self._call("fill_mask", texts, **options)

    async def answer_question(self, inputs, **options) -> Results:
        return await self._call("answer_question", inputs, **options)

    async def zero_shot_classify(self, texts, candidate_labels, **options) -> Results:
        return await self._call("zero_shot_classify", texts, candidate_labels, **options)

    async def embed(self, texts, **options) -> Results:
        return await self._call("embed", texts, **options)

    async def tokenize(self, texts, **options) -> list[Tokenized]:
        return await self._call("tokenize", texts, **options)

    async def detokenize(self, sequences, **options) -> list[str]:
        return await self._call("detokenize", sequences, **options)

    async def info(self) -> Info:
        return parse_info(await self.stub.Info(pb.InfoRequest(), timeout=self.timeout))

    async def answer_table_question(self, inputs, **options) -> Results:
        return await self._call("answer_table_question", inputs, **options)

    async def classify_audio(self, inputs, **options) -> Results:
        return await self._call("classify_audio", inputs, **options)

    async def transcribe(self, inputs, **options) -> Results:
        return await self._call("transcribe", inputs, **options)

    async def transcribe_stream(self, audio, **options):
        call = self.stub.TranscribeStream(transcribe_request([audio_message(audio)], **options), timeout=self.timeout)
        async for chunk in call:
            yield _transcription(chunk.result) if chunk.HasField("result") else chunk.text

    async def embeddings(self, inputs, model: str = "", adapter: str = "") -> dict:
        reply = await self.stub.Embeddings(pb.EmbeddingsRequest(input=_texts(inputs), model=model, adapter=adapter),
                                           timeout=self.timeout)
        return _embeddings_dict(reply)

    def predict_stream(self, requests: AsyncIterable[pb.PredictRequest] | Iterable[pb.PredictRequest]):
        """An async iterator of PredictResponse, in input order."""
        return self.stub.PredictStream(requests, timeout=self.timeout)


def _embeddings_dict(reply: pb.EmbeddingsResponse) -> dict:
    return {
        "object": reply.object,
        "data": [{"object": d.object, "index": d.index, "embedding": list(d.embedding)} for d in reply.data],
        "model": reply.model,
        "usage": {"prompt_tokens": reply.usage.prompt_tokens, "total_tokens": reply.usage.total_tokens},
    }
