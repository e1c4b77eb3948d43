"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models.

Each route turns OpenAI's JSON into the gRPC request message, calls the servicer's RPC method
(Chat, ChatStream, Complete, CompleteStream, Embeddings) exactly as gRPC would, and writes the
answer in OpenAI's JSON: `null` where OpenAI has null, server-sent events ending with
`data: [DONE]` for `stream: true`, and errors as OpenAI's error object with the HTTP status
of the gRPC code. A field this server does not implement is refused by name.
"""

from __future__ import annotations

import base64
import functools
import time

import numpy as np
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from preproc_service.http.json_io import BadRequest, Fields, dumps, read_json_object
from preproc_service.served_models import adapter_names
from splitserve_common.http_front import CallFailed, HttpCallContext
from splitserve_pb import preproc_pb2 as pb

# Sampling and length fields chat and completions share: name -> (kind, low, high).
COMMON_FIELDS = {
    "max_tokens": ("int", 1, None), "temperature": ("float", 0.0, 2.0), "top_p": ("float", 0.0, 1.0),
    "n": ("int", 1, None), "seed": ("int", 0, 2**64 - 1), "presence_penalty": ("float", -2.0, 2.0),
    "frequency_penalty": ("float", -2.0, 2.0),
    # Beyond OpenAI (as vLLM and TGI take them): the pipeline's own knobs.
    "top_k": ("int", 0, None), "repetition_penalty": ("float", 0.0, None), "do_sample": ("bool", None, None),
}
# Accepted for compatibility, with no effect on the answer: an end-user id for the caller's own records.
IGNORED_FIELDS = ("user",)


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    elif status == 429:
        kind = "rate_limit_error"
    return dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


def error_response(status: int, message: str, code: str | None = None, param: str | None = None) -> Response:
    return Response(error_body(status, message, code, param), status, media_type="application/json")


def failed(exc: CallFailed) -> Response:
    status = exc.http_status
    code = "model_not_found" if status == 404 and exc.message.startswith("The model ") else None
    return error_response(status, exc.message, code)


def json_response(value) -> Response:
    return Response(dumps(value), media_type="application/json")


# ---------------------------------------------------------------- request JSON -> gRPC messages


def _common(fields: Fields, message) -> None:
    for name, (kind, low, high) in COMMON_FIELDS.items():
        value = getattr(fields, kind)(name, low, high) if kind != "bool" else fields.bool(name)
        if value is not None:
            setattr(message, name, value)
    stop = fields.str_or_list("stop")
    if stop:
        if len(stop) > 4:
            raise BadRequest("'stop' takes at most 4 sequences", "stop")
        message.stop.extend(stop)
    message.model = fields.str("model") or ""
    for name in IGNORED_FIELDS:
        fields.raw(name)


def _stream_options(fields: Fields) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = bool(fields.bool("stream"))
    options = fields.object("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise BadRequest("'stream_options' is only allowed with stream: true", "stream_options")
    inner = Fields(options, "stream_options.")
    include_usage = bool(inner.bool("include_usage"))
    inner.refuse_left_over()
    return stream, include_usage


def _message_text(message: dict, index: int) -> str:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"messages[{index}].content: only text parts are supported", "messages")
            parts.append(part["text"])
        return "\n".join(parts)
    raise BadRequest(f"messages[{index}].content must be a string or a list of text parts", "messages")


def chat_request(body: dict) -> tuple[pb.ChatRequest, bool, bool]:
    fields = Fields(body)
    request = pb.ChatRequest()
    messages = fields.raw("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string 'role'", "messages")
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise BadRequest(f"unsupported parameter 'messages[{i}].{extra[0]}': this server does not implement it",
                             "messages")
        request.messages.add(role=message["role"], content=_message_text(message, i))
    _common(fields, request)
    max_completion = fields.int("max_completion_tokens", 1)
    if max_completion is not None:
        request.max_completion_tokens = max_completion
    logprobs = fields.bool("logprobs")
    if logprobs is not None:
        request.logprobs = logprobs
    top = fields.int("top_logprobs", 0, 20)
    if top is not None:
        request.top_logprobs = top
    response_format = fields.object("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise BadRequest("'response_format': only {\"type\": \"text\"} is supported", "response_format")
    stream, include_usage = _stream_options(fields)
    fields.refuse_left_over()
    return request, stream, include_usage


def completion_request(body: dict) -> tuple[pb.CompletionRequest, bool, bool]:
    fields = Fields(body)
    request = pb.CompletionRequest()
    prompt = fields.raw("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be one string (send several prompts as several requests)", "prompt")
    request.prompt = prompt
    _common(fields, request)
    logprobs = fields.int("logprobs", 0, 5)
    if logprobs is not None:
        request.logprobs = logprobs
    if fields.bool("echo"):
        raise BadRequest("'echo': true is not supported", "echo")
    if fields.str("suffix"):
        raise BadRequest("'suffix' is not supported", "suffix")
    best_of = fields.int("best_of", 1)
    if best_of is not None and best_of != (request.n if request.HasField("n") else 1):
        raise BadRequest("'best_of' other than n is not supported", "best_of")
    stream, include_usage = _stream_options(fields)
    fields.refuse_left_over()
    return request, stream, include_usage


def embeddings_request(body: dict) -> tuple[pb.EmbeddingsRequest, str]:
    fields = Fields(body)
    texts = fields.raw("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise BadRequest("'input' must be a string or a non-empty list of strings", "input")
    request = pb.EmbeddingsRequest(input=texts, model=fields.str("model") or "")
    dimensions = fields.int("dimensions", 1)
    if dimensions is not None:
        request.dimensions = dimensions
    encoding = fields.str("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise BadRequest("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    for name in IGNORED_FIELDS:
        fields.raw(name)
    fields.refuse_left_over()
    return request, encoding


# ---------------------------------------------------------------- gRPC messages -> OpenAI JSON


def _usage(usage: pb.Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def _token_entry(entry) -> dict:
    return {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.bytes)}


def chat_logprobs(choice) -> dict | None:
    if not choice.HasField("logprobs"):
        return None
    content = [{**_token_entry(e), "top_logprobs": [_token_entry(t) for t in e.top_logprobs]}
               for e in choice.logprobs.content]
    return {"content": content, "refusal": None}


def completion_logprobs(choice, offset: int, top: int) -> tuple[dict | None, int]:
    """OpenAI's legacy completions logprobs ({tokens, token_logprobs, top_logprobs, text_offset}),
    and the text offset after these tokens."""
    if not choice.HasField("logprobs"):
        return None, offset
    tokens, values, tops, offsets = [], [], [], []
    for entry in choice.logprobs.content:
        tokens.append(entry.token)
        values.append(entry.logprob)
        tops.append({t.token: t.logprob for t in entry.top_logprobs} if top else None)
        offsets.append(offset)
        offset += len(entry.token)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}, offset


def _finish(reason: str) -> str | None:
    return reason or None


def chat_completion_json(answer: pb.ChatCompletion) -> dict:
    return {
        "id": answer.id, "object": "chat.completion", "created": answer.created, "model": answer.model,
        "choices": [{"index": c.index, "message": {"role": c.message.role or "assistant",
                                                   "content": c.message.content, "refusal": None},
                     "logprobs": chat_logprobs(c), "finish_reason": _finish(c.finish_reason)}
                    for c in answer.choices],
        "usage": _usage(answer.usage), "system_fingerprint": None,
    }


def completion_json(answer: pb.Completion, prompt_chars: int, top: int) -> dict:
    choices = []
    for c in answer.choices:
        logprobs, _ = completion_logprobs(c, prompt_chars, top)
        choices.append({"index": c.index, "text": c.text, "logprobs": logprobs,
                        "finish_reason": _finish(c.finish_reason)})
    return {"id": answer.id, "object": "text_completion", "created": answer.created, "model": answer.model,
            "choices": choices, "usage": _usage(answer.usage), "system_fingerprint": None}


# ---------------------------------------------------------------- the routes


def _openai_errors(route):
    """A refused request (BadRequest) or a failed call (CallFailed) answered as OpenAI's error object."""
    @functools.wraps(route)
    async def answer(self, http_request: Request) -> Response:
        try:
            return await route(self, http_request)
        except BadRequest as exc:
            return error_response(exc.status, exc.message, exc.code, exc.param)
        except CallFailed as exc:
            return failed(exc)

    return answer



class OpenAIRoutes:
    def __init__(self, servicer):
        self.servicer = servicer
        self.created = int(time.time())

    def routes(self) -> list[Route]:
        return [Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model, methods=["GET"])]

    @staticmethod
    def _context(http_request: Request) -> HttpCallContext:
        return HttpCallContext(http_request.scope["state"]["request_id"])

    @_openai_errors
    async def chat(self, http_request: Request) -> Response:
        request, stream, include_usage = chat_request(await read_json_object(http_request))
        context = self._context(http_request)
        if stream:
            return await self._stream(self.servicer.ChatStream(request, context), include_usage, _chat_chunk_json,
                                      prefetch=2)
        return json_response(chat_completion_json(await self.servicer.Chat(request, context)))

    @_openai_errors
    async def completions(self, http_request: Request) -> Response:
        request, stream, include_usage = completion_request(await read_json_object(http_request))
        context = self._context(http_request)
        top = request.logprobs if request.HasField("logprobs") else 0
        if stream:
            offsets: dict[int, int] = {}

            def chunk_json(chunk):
                return _completion_chunk_json(chunk, offsets, len(request.prompt), top)

            return await self._stream(self.servicer.CompleteStream(request, context), include_usage, chunk_json)
        answer = await self.servicer.Complete(request, context)
        return json_response(completion_json(answer, len(request.prompt), top))

    @_openai_errors
    async def embeddings(self, http_request: Request) -> Response:
        request, encoding = embeddings_request(await read_json_object(http_request))
        answer = await self.servicer.Embeddings(request, self._context(http_request))
        return json_response({
            "object": "list", "model": answer.model,
            "data": [{"object": "embedding", "index": d.index, "embedding": _encode_vector(d.embedding, encoding)}
                     for d in answer.data],
            "usage": {"prompt_tokens": answer.usage.prompt_tokens, "total_tokens": answer.usage.total_tokens},
        })

    async def models(self, http_request: Request) -> Response:
        return json_response({"object": "list", "data": await self._model_list()})

    async def model(self, http_request: Request) -> Response:
        name = http_request.path_params["model"]
        for entry in await self._model_list():
            if entry["id"] == name:
                return json_response(entry)
        return error_response(404, f"The model '{name}' does not exist", "model_not_found", "model")

    async def _model_list(self) -> list[dict]:
        dep = self.servicer.dep
        served = dep.model_name
        entries = [{"id": served, "object": "model", "created": self.created, "owned_by": "splitserve",
                    "root": served, "parent": None}]
        for name in await adapter_names(dep, refresh=True):
            entries.append({"id": name, "object": "model", "created": self.created, "owned_by": "splitserve",
                            "root": served, "parent": served})
        return entries

    async def _stream(self, chunks, include_usage: bool, to_json, prefetch: int = 1) -> Response:
        """Server-sent events of `chunks`. The first `prefetch` chunks are awaited before answering, so a
        request the handlers refuse gets its HTTP status; a failure later is sent as an error event."""
        head = []
        try:
            async for chunk in chunks:
                head.append(chunk)
                if len(head) >= prefetch:
                    break
        except CallFailed as exc:
            await chunks.aclose()
            return failed(exc)

        async def events():
            usage, last = None, None
            try:
                async for chunk in _resume(head, chunks):
                    body, last = to_json(chunk), chunk
                    if chunk.HasField("usage"):
                        usage = _usage(chunk.usage)
                    if include_usage:
                        body["usage"] = None
                    yield b"data: " + dumps(body) + b"\n\n"
                if include_usage and usage is not None:
                    final = to_json(last)
                    final.update(choices=[], usage=usage)
                    yield b"data: " + dumps(final) + b"\n\n"
            except CallFailed as exc:
                yield b"data: " + error_body(exc.http_status, exc.message) + b"\n\n"
            finally:
                await chunks.aclose()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


async def _resume(head: list, chunks):
    """The prefetched chunks, then the rest of the stream."""
    for chunk in head:
        yield chunk
    async for chunk in chunks:
        yield chunk


def _chat_chunk_json(chunk: pb.ChatCompletionChunk) -> dict:
    choices = []
    for c in chunk.choices:
        delta = {}
        if c.delta.role:
            delta["role"] = c.delta.role
            delta["content"] = c.delta.content
        elif c.delta.content or not c.finish_reason:
            delta["content"] = c.delta.content
        choices.append({"index": c.index, "delta": delta, "logprobs": chat_logprobs(c),
                        "finish_reason": _finish(c.finish_reason)})
    return {"id": chunk.id, "object": "chat.completion.chunk", "created": chunk.created, "model": chunk.model,
            "system_fingerprint": None, "choices": choices}


def _completion_chunk_json(chunk: pb.CompletionChunk, offsets: dict, prompt_chars: int, top: int) -> dict:
    choices = []
    for c in chunk.choices:
        logprobs, offsets[c.index] = completion_logprobs(c, offsets.get(c.index, prompt_chars), top)
        choices.append({"index": c.index, "text": c.text, "logprobs": logprobs,
                        "finish_reason": _finish(c.finish_reason)})
    return {"id": chunk.id, "object": "text_completion", "created": chunk.created, "model": chunk.model,
            "system_fingerprint": None, "choices": choices}


def _encode_vector(values, encoding: str):
    if encoding == "base64":
        return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")
    return list(values)
