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

import contextlib
import json
import time
import uuid

from preproc_service.generation.request_params import GenerationParams
from preproc_service.generation.stream import Piece, generate_pieces, generation_stub
from preproc_service.generation.text_filters import WhitespaceCollapser
from preproc_service.precedence import explicit_fields
from preproc_service.tokenization import EncodeOptions
from splitserve_common import tasks
from splitserve_common.errors import FailedPrecondition, InvalidArgument
from splitserve_pb import generation_pb2 as gpb
from splitserve_pb import preproc_pb2 as pb

TEXT_KEYS = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
             "seed", "stop", "return_full_text", "include_prompt", "collapse_whitespace", "logprobs")
LLM_KEYS = ("temperature", "top_p", "top_k", "stop", "seed", "do_sample", "repetition_penalty")


def _seq2seq(task: str) -> bool:
    task_spec = tasks.spec(task)
    return task_spec is not None and task_spec.generation == "seq2seq"


class GenerationHandlers:
    """What preproc's servicer calls for GenerateText*, Chat* and Complete*.

    `deployment`: preproc_service.deployment.Deployment; `scope`: the request's RequestScope.
    Unary methods return the response message; *_stream methods are async iterators of chunks.
    """

    def __init__(self, deployment):
        self.dep = deployment
        self._stub = None

    @property
    def stub(self):
        if self._stub is None:
            self._stub = generation_stub(self.dep.model._channel)
        return self._stub

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
    async def _pieces(self, ids, params: GenerationParams, scope, adapter: str, context_ids=()):
        request = gpb.GenerateRequest(model_name=self.dep.model.model_name, id=uuid.uuid4().hex, input_ids=ids,
                                      settings=params.settings, adapter=adapter or scope.adapter)
        pieces = generate_pieces(self.stub, request, self.tokenizer, context_ids=context_ids,
                                 stops=params["stop"], timeout=scope.remaining(), address=self.dep.model.address)
        async with contextlib.aclosing(pieces):
            yield pieces

    # ------------------------------------------------------------------ text tasks

    async def _text_plan(self, request, scope):
        """(prompt ids, params, text to emit first, detokenizer context, collapse?) for GenerateText*."""
        if not request.prompt:
            raise InvalidArgument("prompt is empty: generation needs text to start from")
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

    def _llm_params(self, request) -> GenerationParams:
        if request.HasField("n") and request.n != 1:
            raise InvalidArgument(f"n={request.n}: only one choice per request is supported")
        explicit = explicit_fields(request, LLM_KEYS)
        if request.HasField("max_tokens"):
            explicit["max_new_tokens"] = request.max_tokens
        # OpenAI semantics: a positive temperature asks for sampling.
        if "do_sample" not in explicit and explicit.get("temperature", 0) > 0:
            explicit["do_sample"] = True
        return self._params(explicit)

    async def _chat_plan(self, request, scope):
        if not request.messages:
            raise InvalidArgument("messages is empty: send at least one chat message")
        if not getattr(self.tokenizer, "chat_template", None):
            raise FailedPrecondition("this model's tokenizer has no chat template (components/tokenizer has no "
                                     "chat_template); use Complete or GenerateText with a plain prompt")
        params = self._llm_params(request)
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
        ids, params = await self._chat_plan(request, scope)
        head = _openai_head("chatcmpl", self._model_name(request))
        first = pb.ChatCompletionChunk(object="chat.completion.chunk", **head)
        first.choices.add(index=0, delta=pb.ChatDelta(role="assistant"))
        yield first
        async with self._pieces(ids, params, scope, request.adapter, ids) as pieces:
            async for piece in pieces:
                chunk = pb.ChatCompletionChunk(object="chat.completion.chunk", **head)
                choice = chunk.choices.add(index=0, delta=pb.ChatDelta(content=piece.text))
                if piece.finish_reason:
                    choice.finish_reason = piece.finish_reason
                    chunk.usage.CopyFrom(_usage(len(ids), piece))
                if piece.text or piece.finish_reason:
                    yield chunk

    async def chat(self, request, scope):
        parts, last = [], None
        async for chunk in self.chat_stream(request, scope):
            parts.append(chunk.choices[0].delta.content)
            last = chunk
        response = pb.ChatCompletion(id=last.id, object="chat.completion", created=last.created, model=last.model,
                                     usage=last.usage)
        response.choices.add(index=0, message=pb.ChatMessage(role="assistant", content="".join(parts)),
                             finish_reason=last.choices[0].finish_reason)
        return response

    # ------------------------------------------------------------------ llm/v1/completions

    async def complete_stream(self, request, scope):
        if not request.prompt:
            raise InvalidArgument("prompt is empty: completion needs text to start from")
        params = self._llm_params(request)
        template = self.dep.model_dir.prompt_template
        text = template.replace("{prompt}", request.prompt) if template else request.prompt
        with scope.stage("tokenize"):
            ids = await self._encode(text, add_special_tokens=True)
        head = _openai_head("cmpl", self._model_name(request))
        async with self._pieces(ids, params, scope, request.adapter, ids) as pieces:
            async for piece in pieces:
                chunk = pb.CompletionChunk(object="text_completion", **head)
                choice = chunk.choices.add(index=0, text=piece.text)
                if piece.finish_reason:
                    choice.finish_reason = piece.finish_reason
                    chunk.usage.CopyFrom(_usage(len(ids), piece))
                if piece.text or piece.finish_reason:
                    yield chunk

    async def complete(self, request, scope):
        parts, last = [], None
        async for chunk in self.complete_stream(request, scope):
            parts.append(chunk.choices[0].text)
            last = chunk
        response = pb.Completion(id=last.id, object="text_completion", created=last.created, model=last.model,
                                 usage=last.usage)
        response.choices.add(index=0, text="".join(parts), finish_reason=last.choices[0].finish_reason)
        return response

    def _model_name(self, request) -> str:
        info = self.dep.info
        return request.model or (info.name if info else "") or self.dep.model.model_name


def _openai_head(prefix: str, model: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}


def _usage(prompt_tokens: int, piece: Piece) -> pb.Usage:
    return pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=piece.completion_tokens,
                    total_tokens=prompt_tokens + piece.completion_tokens)
