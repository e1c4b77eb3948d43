"""Generation tasks on the preproc side, streamed and not.

- text-generation (GenerateText*): MLflow's prompt_template, return_full_text / include_prompt,
  collapse_whitespace; the text is the pipeline's: prompt (when asked) + generated text.
- text2text-generation, summarization, translation_xx_to_yy (GenerateText*): transformers
  4.x pipeline semantics: the config's `prefix` (or task_specific_params[task].prefix) is
  prepended, the encoder gets the tokenized input, the answer is the decoded output only.
- llm/v1/chat (Chat*) and llm/v1/completions (Complete*): OpenAI-shaped answers and chunks,
  usage as MLflow counts it (prompt tokens of the templated prompt, generated tokens).

Every non-streamed answer is assembled from the same pieces its streamed twin sends, so the
concatenated stream always equals the non-streamed text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from preproc_service.generation.request_params import GenerationParams
from preproc_service.generation.stream import Piece, generate_pieces
from preproc_service.generation.text_filters import WhitespaceCollapser
from preproc_service.precedence import explicit_fields
from preproc_service.served_models import resolve_model
from preproc_service.tokenization import EncodeOptions
from splitserve_common import tasks
from splitserve_common.errors import FailedPrecondition, InvalidArgument
from splitserve_pb import generation_pb2 as gpb
from splitserve_pb import preproc_pb2 as pb

TEXT_KEYS = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
             "seed", "stop", "return_full_text", "include_prompt", "collapse_whitespace", "logprobs",
             "presence_penalty", "frequency_penalty", "num_beams", "num_return_sequences", "length_penalty",
             "no_repeat_ngram_size", "early_stopping")
LLM_KEYS = ("temperature", "top_p", "top_k", "stop", "seed", "do_sample", "repetition_penalty", "presence_penalty",
            "frequency_penalty")
DEFAULT_MAX_CHOICES = 8
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound for completions' logprobs


def _seq2seq(task: str) -> bool:
    task_spec = tasks.spec(task)
    return task_spec is not None and task_spec.generation == "seq2seq"


class GenerationHandlers:
    """What preproc's servicer calls for GenerateText*, Chat* and Complete*.

    `deployment`: preproc_service.deployment.Deployment; `scope`: the request's RequestScope.
    Unary methods return the response message; *_stream methods are async iterators of chunks.
    """

    def __init__(self, deployment, max_choices: int = DEFAULT_MAX_CHOICES):
        self.dep = deployment
        self.max_choices = max_choices
        self._token_texts: dict[int, str] = {}  # token id -> its text, for logprobs

    @property
    def stub(self):
        return self.dep.model.generation

    @property
    def tokenizer(self):
        return self.dep.tokenizer

    # ------------------------------------------------------------------ plumbing

    async def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        groups = await self.dep.tokenization.encode([text], EncodeOptions(add_special_tokens=add_special_tokens))
        return list(groups[0][0].ids)

    def _params(self, explicit: dict) -> GenerationParams:
        return GenerationParams(self.dep.precedence, self.dep.task, explicit)

    @contextlib.asynccontextmanager
    async def _pieces(self, ids, params: GenerationParams, scope, adapter: str, context_ids=(), settings=None):
        request = gpb.GenerateRequest(model_name=self.dep.model.model_name, id=uuid.uuid4().hex, input_ids=ids,
                                      settings=settings or params.settings, adapter=adapter or scope.adapter)
        pieces = generate_pieces(self.stub, request, self.tokenizer, context_ids=context_ids,
                                 stops=params["stop"], timeout=scope.remaining(), address=self.dep.model.address)
        async with contextlib.aclosing(pieces):
            yield pieces

    # ------------------------------------------------------------------ text tasks

    async def _text_plan(self, request, scope):
        """(prompt ids, params, text to emit first, detokenizer context, collapse?) for GenerateText*."""
        if not request.prompt:
            raise InvalidArgument("prompt is empty: generation needs text to start from")
        self.dep.limits.check_text(request.prompt, "the prompt")
        params = self._params(explicit_fields(request.parameters, TEXT_KEYS))
        task = self.dep.task
        with scope.stage("tokenize"):
            if _seq2seq(task):
                ids = await self._encode(self._prefix(task) + request.prompt, add_special_tokens=True)
                return ids, params, "", (), params["collapse_whitespace"]
            template = self.dep.model_dir.prompt_template
            text = template.replace("{prompt}", request.prompt) if template else request.prompt
            # MLflow: with a prompt_template the prompt is left out unless asked for.
            full = params.applied.get("include_prompt", params.applied.get("return_full_text", not template))
            ids = await self._encode(text, add_special_tokens=True)
        return ids, params, text if full else "", ids, params["collapse_whitespace"]

    def _prefix(self, task: str) -> str:
        config = self.dep.model_dir.config or {}
        specific = (config.get("task_specific_params") or {}).get(task) or {}
        return specific.get("prefix") or config.get("prefix") or ""

    async def generate_text_stream(self, request, scope, plan=None):
        ids, params, head, context, collapse = plan or await self._text_plan(request, scope)
        collapser = WhitespaceCollapser() if collapse else None
        if head:
            text = collapser.feed(head) if collapser else head
            if text:
                yield pb.GenerateTextChunk(text=text)
        async with self._pieces(ids, params, scope, request.adapter, context) as pieces:
            async for piece in pieces:
                text = collapser.feed(piece.text) if collapser else piece.text
                chunk = pb.GenerateTextChunk(text=text, token_ids=piece.token_ids, logprobs=piece.logprobs)
                if piece.finish_reason:
                    chunk.finish_reason = piece.finish_reason
                    chunk.usage.CopyFrom(_usage(len(ids), piece))
                    chunk.meta.applied_parameters.update({k: json.dumps(v) for k, v in params.applied.items()})
                yield chunk

    async def generate_text(self, request, scope):
        plan = await self._text_plan(request, scope)
        parts, last = [], None
        response = pb.GenerateTextResponse()
        async for chunk in self.generate_text_stream(request, scope, plan):
            parts.append(chunk.text)
            response.token_ids.extend(chunk.token_ids)
            response.logprobs.extend(chunk.logprobs)
            last = chunk
        response.generated_text, response.finish_reason = "".join(parts), last.finish_reason
        response.usage.CopyFrom(last.usage)
        response.meta.CopyFrom(last.meta)
        response.meta.timings_ms.update(scope.timings_ms)
        return response

    # ------------------------------------------------------------------ llm/v1/chat

    def _llm_params(self, request, logprobs: bool, top_logprobs: int) -> GenerationParams:
        explicit = explicit_fields(request, LLM_KEYS)
        lengths = {name: getattr(request, name) for name in ("max_tokens", "max_completion_tokens")
                   if name in request.DESCRIPTOR.fields_by_name and request.HasField(name)}
        if len(set(lengths.values())) > 1:
            raise InvalidArgument(f"max_tokens={lengths['max_tokens']} and max_completion_tokens="
                                  f"{lengths['max_completion_tokens']} disagree: send one of them")
        if lengths:
            explicit["max_new_tokens"] = next(iter(lengths.values()))
        # OpenAI semantics: a positive temperature asks for sampling.
        if "do_sample" not in explicit and explicit.get("temperature", 0) > 0:
            explicit["do_sample"] = True
        if logprobs:
            explicit["logprobs"], explicit["top_logprobs"] = True, top_logprobs
        return self._params(explicit)

    def _choices(self, request) -> int:
        n = request.n if request.HasField("n") else 1
        if not 1 <= n <= self.max_choices:
            raise InvalidArgument(f"n={n}: choices per request must be in [1, {self.max_choices}] "
                                  "(--max-choices)")
        return n

    async def _chat_plan(self, request, scope):
        if not request.messages:
            raise InvalidArgument("messages is empty: send at least one chat message")
        self.dep.limits.check_text("".join(m.content for m in request.messages), "the messages together")
        if not getattr(self.tokenizer, "chat_template", None):
            raise FailedPrecondition("this model's tokenizer has no chat template (components/tokenizer has no "
                                     "chat_template); use Complete or GenerateText with a plain prompt")
        top = request.top_logprobs if request.HasField("top_logprobs") else 0
        if top and not request.logprobs:
            raise InvalidArgument("top_logprobs needs logprobs: true")
        params = self._llm_params(request, request.logprobs, top)
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        with scope.stage("tokenize"):
            try:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # noqa: BLE001 - a template may reject the conversation (roles, order)
                raise InvalidArgument(f"the chat template rejected these messages: {exc}") from None
            # MLflow counts prompt tokens of the templated prompt without special tokens.
            ids = await self._encode(text, add_special_tokens=False)
        return ids, params

    async def chat_stream(self, request, scope):
        n = self._choices(request)
        model, adapter = await resolve_model(self.dep, request.model, request.adapter)
        ids, params = await self._chat_plan(request, scope)
        head = _openai_head("chatcmpl", model)
        first = pb.ChatCompletionChunk(object="chat.completion.chunk", **head)
        for index in range(n):
            first.choices.add(index=index, delta=pb.ChatDelta(role="assistant"))
        yield first
        async for index, piece, usage in self._choice_pieces(ids, params, scope, adapter, n):
            chunk = pb.ChatCompletionChunk(object="chat.completion.chunk", **head)
            choice = chunk.choices.add(index=index, delta=pb.ChatDelta(content=piece.text))
            if self._fill_chunk(chunk, choice, piece, params, usage):
                yield chunk

    def _fill_chunk(self, chunk, choice, piece, params, usage) -> bool:
        """Add a piece's log-probabilities, finish reason and the usage to a streamed chunk; whether the
        chunk carries anything worth sending."""
        self._add_logprobs(choice, piece, params)
        if piece.finish_reason:
            choice.finish_reason = piece.finish_reason
        if usage is not None:
            chunk.usage.CopyFrom(usage)
        return bool(piece.text or piece.finish_reason or choice.HasField("logprobs"))

    async def chat(self, request, scope):
        answer = _Gathered()
        async for chunk in self.chat_stream(request, scope):
            answer.add(chunk, [(c.index, c.delta.content, c) for c in chunk.choices])
        response = pb.ChatCompletion(id=answer.head.id, object="chat.completion", created=answer.head.created,
                                     model=answer.head.model, usage=answer.head.usage)
        for index in sorted(answer.texts):
            choice = response.choices.add(index=index, finish_reason=answer.finish[index],
                                          message=pb.ChatMessage(role="assistant", content=answer.text(index)))
            if index in answer.logprobs:
                choice.logprobs.content.extend(answer.logprobs[index])
        return response

    # ------------------------------------------------------------------ llm/v1/completions

    async def complete_stream(self, request, scope):
        if not request.prompt:
            raise InvalidArgument("prompt is empty: completion needs text to start from")
        self.dep.limits.check_text(request.prompt, "the prompt")
        n = self._choices(request)
        model, adapter = await resolve_model(self.dep, request.model, request.adapter)
        top = request.logprobs if request.HasField("logprobs") else 0
        if not 0 <= top <= MAX_COMPLETION_LOGPROBS:
            raise InvalidArgument(f"logprobs={top}: must be in [0, {MAX_COMPLETION_LOGPROBS}]")
        params = self._llm_params(request, request.HasField("logprobs"), top)
        template = self.dep.model_dir.prompt_template
        text = template.replace("{prompt}", request.prompt) if template else request.prompt
        with scope.stage("tokenize"):
            ids = await self._encode(text, add_special_tokens=True)
        head = _openai_head("cmpl", model)
        async for index, piece, usage in self._choice_pieces(ids, params, scope, adapter, n):
            chunk = pb.CompletionChunk(object="text_completion", **head)
            choice = chunk.choices.add(index=index, text=piece.text)
            if self._fill_chunk(chunk, choice, piece, params, usage):
                yield chunk

    async def complete(self, request, scope):
        answer = _Gathered()
        async for chunk in self.complete_stream(request, scope):
            answer.add(chunk, [(c.index, c.text, c) for c in chunk.choices])
        response = pb.Completion(id=answer.head.id, object="text_completion", created=answer.head.created,
                                 model=answer.head.model, usage=answer.head.usage)
        for index in sorted(answer.texts):
            choice = response.choices.add(index=index, text=answer.text(index), finish_reason=answer.finish[index])
            if index in answer.logprobs:
                choice.logprobs.content.extend(answer.logprobs[index])
        return response

    # ------------------------------------------------------------------ choices and logprobs

    async def _choice_pieces(self, ids, params: GenerationParams, scope, adapter: str, n: int):
        """(choice index, piece, usage or None) from `n` generations of one prompt, as they come.

        Choice i samples with seed + i when a seed is set (reproducible, yet different choices).
        Usage (completion tokens of every choice) rides on the piece that finishes the last choice.
        """
        seeded = params.settings.HasField("seed")
        streams = []
        async with contextlib.AsyncExitStack() as stack:
            for index in range(n):
                settings = type(params.settings)()
                settings.CopyFrom(params.settings)
                if seeded:
                    settings.seed = (params.settings.seed + index) % 2**64
                streams.append(await stack.enter_async_context(self._pieces(ids, params, scope, adapter, ids,
                                                                            settings=settings)))
            completion, finished = 0, 0
            async for index, piece in merge_streams(streams):
                usage = None
                if piece.finish_reason:
                    completion += piece.completion_tokens
                    finished += 1
                    if finished == n:
                        usage = pb.Usage(prompt_tokens=len(ids), completion_tokens=completion,
                                         total_tokens=len(ids) + completion)
                yield index, piece, usage

    def _add_logprobs(self, choice, piece: Piece, params: GenerationParams) -> None:
        if not params.settings.logprobs or not piece.token_ids:
            return
        tops = piece.top_logprobs or [None] * len(piece.token_ids)
        for token_id, logprob, top in zip(piece.token_ids, piece.logprobs, tops, strict=True):
            token = self._token_text(token_id)
            entry = choice.logprobs.content.add(token=token, logprob=logprob, bytes=list(token.encode()))
            for alt_id, alt_logprob in zip(top.token_ids, top.logprobs, strict=True) if top is not None else ():
                alt = self._token_text(alt_id)
                entry.top_logprobs.add(token=alt, logprob=alt_logprob, bytes=list(alt.encode()))

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text


class _Gathered:
    """A streamed answer's chunks joined back into whole choices (the non-streamed answer)."""

    def __init__(self):
        self.head = None
        self.texts: dict[int, list[str]] = {}
        self.finish: dict[int, str] = {}
        self.logprobs: dict[int, list] = {}

    def add(self, chunk, choices) -> None:
        if self.head is None or chunk.HasField("usage"):
            self.head = chunk
        for index, text, choice in choices:
            self.texts.setdefault(index, []).append(text)
            if choice.finish_reason:
                self.finish[index] = choice.finish_reason
            if choice.HasField("logprobs"):
                self.logprobs.setdefault(index, []).extend(choice.logprobs.content)

    def text(self, index: int) -> str:
        return "".join(self.texts[index])


async def merge_streams(streams):
    """(index, item) from several async iterators at once, in arrival order; each stream in its own order."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index, stream):
        try:
            async for item in stream:
                await queue.put((index, item))
            await queue.put((index, done))
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, which raises it
            await queue.put((index, exc))

    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            index, item = await queue.get()
            if item is done:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # before the streams are closed


def _openai_head(prefix: str, model: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}


def _usage(prompt_tokens: int, piece: Piece) -> pb.Usage:
    return pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=piece.completion_tokens,
                    total_tokens=prompt_tokens + piece.completion_tokens)
