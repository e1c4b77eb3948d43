"""Generation clients for preproc_service: `GenerationClient` (blocking) and `AsyncGenerationClient`.

    with GenerationClient("127.0.0.1:8011") as client:
        answer = client.generate("Once upon a time", max_new_tokens=40)     # Generated(text, ...)
        for text in client.generate_stream("Once upon a time"):             # text as it arrives
            print(text, end="", flush=True)
        reply = client.chat([{"role": "user", "content": "Hi"}], max_tokens=30)
        for text in client.chat_stream([{"role": "user", "content": "Hi"}]): ...
        client.complete("The river", max_tokens=20)

Keyword settings are the GenerateTextParameters fields (max_new_tokens, temperature, top_p,
top_k, do_sample, seed, stop=[...], return_full_text, logprobs, ...) for generate, and the OpenAI
ones (max_tokens, temperature, top_p, top_k, stop, seed, ...) for chat / complete. A stream
iterator's `result` holds the finish reason and usage once it is exhausted; breaking out
of the loop (or `close()`) cancels the call, which stops generation on the model.
generate's answers (streamed or not) also carry the generated `token_ids`, their `logprobs`
(with logprobs=True) and the `applied_parameters` (name -> value, after MLflow's precedence).
Errors arrive as grpc.RpcError / grpc.aio.AioRpcError with the service's status and message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import grpc

from client.channel_client import AsyncChannelClient, ChannelClient
from splitserve_pb import preproc_pb2 as pb
from splitserve_pb import preproc_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:8011"


@dataclass
class Generated:
    text: str
    finish_reason: str = ""  # length | stop
    prompt_tokens: int = 0
    completion_tokens: int = 0
    id: str = ""             # chat / completion id
    token_ids: list[int] = field(default_factory=list)     # generate: the generated ids
    logprobs: list[float] = field(default_factory=list)    # generate with logprobs=True: one per token id
    applied_parameters: dict = field(default_factory=dict)  # generate: what was applied, after precedence


def _text_request(prompt: str, adapter: str, settings: dict) -> pb.GenerateTextRequest:
    stop = settings.pop("stop", None)
    params = pb.GenerateTextParameters(**settings)
    params.stop.extend([stop] if isinstance(stop, str) else stop or [])
    return pb.GenerateTextRequest(prompt=prompt, parameters=params, adapter=adapter)


def _chat_request(messages, adapter: str, settings: dict) -> pb.ChatRequest:
    stop = settings.pop("stop", None)
    request = pb.ChatRequest(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
                             adapter=adapter, **settings)
    request.stop.extend([stop] if isinstance(stop, str) else stop or [])
    return request


def _completion_request(prompt: str, adapter: str, settings: dict) -> pb.CompletionRequest:
    stop = settings.pop("stop", None)
    request = pb.CompletionRequest(prompt=prompt, adapter=adapter, **settings)
    request.stop.extend([stop] if isinstance(stop, str) else stop or [])
    return request


def _usage(result: Generated, usage) -> Generated:
    result.prompt_tokens, result.completion_tokens = usage.prompt_tokens, usage.completion_tokens
    return result


def _applied(meta) -> dict:
    return {k: json.loads(v) for k, v in meta.applied_parameters.items()}


def _generated(reply: pb.GenerateTextResponse) -> Generated:
    result = Generated(reply.generated_text, reply.finish_reason, token_ids=list(reply.token_ids),
                       logprobs=list(reply.logprobs), applied_parameters=_applied(reply.meta))
    return _usage(result, reply.usage)


# What each kind of chunk carries: (text of the chunk, finish_reason, usage, id).
def _text_chunk(chunk):
    return chunk.text, chunk.finish_reason, chunk.usage, ""


def _text_extras(result: Generated, chunk) -> None:
    result.token_ids.extend(chunk.token_ids)
    result.logprobs.extend(chunk.logprobs)
    if chunk.finish_reason:
        result.applied_parameters = _applied(chunk.meta)


def _chat_chunk(chunk):
    choice = chunk.choices[0] if chunk.choices else None
    return (choice.delta.content if choice else ""), (choice.finish_reason if choice else ""), chunk.usage, chunk.id


def _completion_chunk(chunk):
    choice = chunk.choices[0] if chunk.choices else None
    return (choice.text if choice else ""), (choice.finish_reason if choice else ""), chunk.usage, chunk.id


class TextStream:
    """Iterates over the text of a streamed call; `result` is complete once the stream ends."""

    def __init__(self, call, unpack, extras=None):
        self.call, self.unpack, self.extras = call, unpack, extras
        self.result = Generated("")

    def __iter__(self):
        try:
            for chunk in self.call:
                yield self._take(chunk)
        finally:
            self.call.cancel()  # no-op when the stream ended; stops generation when the caller broke off

    def _take(self, chunk) -> str:
        if self.extras is not None:
            self.extras(self.result, chunk)
        text, finish, usage, chunk_id = self.unpack(chunk)
        self.result.text += text
        self.result.id = self.result.id or chunk_id
        if finish:
            self.result.finish_reason = finish
            _usage(self.result, usage)
        return text

    def close(self) -> None:
        self.call.cancel()


class AsyncTextStream(TextStream):
    def __iter__(self):
        raise TypeError("an asyncio stream: use `async for`")

    async def __aiter__(self):
        try:
            async for chunk in self.call:
                yield self._take(chunk)
        finally:
            self.call.cancel()


class GenerationClient(ChannelClient):
    """Blocking client. `timeout` (seconds) is each call's deadline, passed on to the model service."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float | None = 120.0, channel=None):
        self.timeout = timeout
        self.channel = channel or grpc.insecure_channel(address)
        self.stub = preproc_pb2_grpc.PreprocStub(self.channel)

    def generate(self, prompt: str, adapter: str = "", **settings) -> Generated:
        return _generated(self.stub.GenerateText(_text_request(prompt, adapter, settings), timeout=self.timeout))

    def generate_stream(self, prompt: str, adapter: str = "", **settings) -> TextStream:
        call = self.stub.GenerateTextStream(_text_request(prompt, adapter, settings), timeout=self.timeout)
        return TextStream(call, _text_chunk, _text_extras)

    def chat(self, messages, adapter: str = "", **settings) -> Generated:
        reply = self.stub.Chat(_chat_request(messages, adapter, settings), timeout=self.timeout)
        choice = reply.choices[0]
        return _usage(Generated(choice.message.content, choice.finish_reason, id=reply.id), reply.usage)

    def chat_stream(self, messages, adapter: str = "", **settings) -> TextStream:
        call = self.stub.ChatStream(_chat_request(messages, adapter, settings), timeout=self.timeout)
        return TextStream(call, _chat_chunk)

    def complete(self, prompt: str, adapter: str = "", **settings) -> Generated:
        reply = self.stub.Complete(_completion_request(prompt, adapter, settings), timeout=self.timeout)
        choice = reply.choices[0]
        return _usage(Generated(choice.text, choice.finish_reason, id=reply.id), reply.usage)

    def complete_stream(self, prompt: str, adapter: str = "", **settings) -> TextStream:
        call = self.stub.CompleteStream(_completion_request(prompt, adapter, settings), timeout=self.timeout)
        return TextStream(call, _completion_chunk)


class AsyncGenerationClient(AsyncChannelClient):
    """asyncio client: the same methods as GenerationClient; streams are `async for` iterables."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float | None = 120.0, channel=None):
        self.timeout = timeout
        self.channel = channel or grpc.aio.insecure_channel(address)
        self.stub = preproc_pb2_grpc.PreprocStub(self.channel)

    async def generate(self, prompt: str, adapter: str = "", **settings) -> Generated:
        return _generated(await self.stub.GenerateText(_text_request(prompt, adapter, settings),
                                                       timeout=self.timeout))

    def generate_stream(self, prompt: str, adapter: str = "", **settings) -> AsyncTextStream:
        call = self.stub.GenerateTextStream(_text_request(prompt, adapter, settings), timeout=self.timeout)
        return AsyncTextStream(call, _text_chunk, _text_extras)

    async def chat(self, messages, adapter: str = "", **settings) -> Generated:
        reply = await self.stub.Chat(_chat_request(messages, adapter, settings), timeout=self.timeout)
        choice = reply.choices[0]
        return _usage(Generated(choice.message.content, choice.finish_reason, id=reply.id), reply.usage)

    def chat_stream(self, messages, adapter: str = "", **settings) -> AsyncTextStream:
        call = self.stub.ChatStream(_chat_request(messages, adapter, settings), timeout=self.timeout)
        return AsyncTextStream(call, _chat_chunk)

    async def complete(self, prompt: str, adapter: str = "", **settings) -> Generated:
        reply = await self.stub.Complete(_completion_request(prompt, adapter, settings), timeout=self.timeout)
        choice = reply.choices[0]
        return _usage(Generated(choice.text, choice.finish_reason, id=reply.id), reply.usage)

    def complete_stream(self, prompt: str, adapter: str = "", **settings) -> AsyncTextStream:
        call = self.stub.CompleteStream(_completion_request(prompt, adapter, settings), timeout=self.timeout)
        return AsyncTextStream(call, _completion_chunk)
