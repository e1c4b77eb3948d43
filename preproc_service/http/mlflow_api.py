"""MLflow's scoring protocol (what `mlflow models serve` answers): POST /invocations, GET /ping,
/health, /version.

/invocations takes every input format the MLflow scoring server takes for a transformers model
(JSON `dataframe_split`, `dataframe_records`, `instances`, `inputs`, with `params`; CSV; and for
llm/v1/chat and llm/v1/completions models the unwrapped OpenAI-style payload), calls the
servicer's gRPC methods, and answers in the JSON shapes `mlflow models serve` gives task by task
(tests/fixtures/mlflow_scoring holds its recorded answers). Where MLflow's own answer is wrong
this door is right in the same shape (docs/http.md lists the differences):
- feature-extraction answers every input, not only the first;
- a text pair sent as `dataframe_records` keeps its second text;
- `params` apply the pipeline's parameters as the gRPC API does, also when the signature
  declares none (MLflow then ignores them);
- /version is a JSON string; /ping and /health say 503 while the service cannot answer.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from importlib import metadata

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from preproc_service.http.json_io import BadRequest, dumps, read_body
from preproc_service.http.openai_api import chat_request, completion_request
from splitserve_common.http_front import CallFailed, HttpCallContext
from splitserve_pb import preproc_pb2 as pb

FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")

# MLflow's error codes for the HTTP statuses its scoring server answers with.
ERROR_CODES = {400: "BAD_REQUEST", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "RESOURCE_DOES_NOT_EXIST",
               413: "REQUEST_LIMIT_EXCEEDED", 415: "BAD_REQUEST", 429: "REQUEST_LIMIT_EXCEEDED",
               503: "TEMPORARILY_UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def error_body(status: int, message: str) -> bytes:
    """MLflow's error object: {"error_code": ..., "message": ...}."""
    return dumps({"error_code": ERROR_CODES.get(status, "INTERNAL_ERROR"), "message": message})


def _error(status: int, message: str) -> Response:
    return Response(error_body(status, message), status, media_type="application/json")


def _predictions(value) -> Response:
    return Response(dumps({"predictions": value}), media_type="application/json")


def _version() -> str:
    try:
        return metadata.version("splitserve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


# ---------------------------------------------------------------- request body -> rows and params


def parse_json(body: dict) -> tuple[list, dict]:
    """(rows, params) of a JSON scoring request; a row is a text or a {column: value} dict."""
    formats = [key for key in FORMATS if key in body]
    extra = sorted(set(body) - set(FORMATS) - {"params"})
    if len(formats) != 1 or extra:
        raise BadRequest(f"the body must have exactly one of {', '.join(FORMATS)} (and optionally params); "
                         f"got keys {sorted(body)}")
    params = body.get("params") or {}
    if not isinstance(params, dict):
        raise BadRequest("'params' must be an object")
    kind, value = formats[0], body[formats[0]]
    if kind == "dataframe_split":
        if not isinstance(value, dict) or not isinstance(value.get("data"), list):
            raise BadRequest("'dataframe_split' must be {\"columns\": [...], \"data\": [[...], ...]}")
        columns = value.get("columns") or list(range(max((len(r) for r in value["data"]), default=0)))
        rows = []
        for row in value["data"]:
            if not isinstance(row, list) or len(row) != len(columns):
                raise BadRequest(f"'dataframe_split' rows must be lists of {len(columns)} values")
            rows.append(dict(zip(columns, row, strict=True)))
        return rows, params
    if kind == "dataframe_records":
        if not isinstance(value, list):
            raise BadRequest("'dataframe_records' must be a list of {column: value} objects")
        return value, params
    # instances / inputs (TF serving): a value, a list of values, or columns as lists.
    if isinstance(value, dict):
        lengths = {len(v) for v in value.values() if isinstance(v, list)}
        if len(lengths) == 1 and all(isinstance(v, list) for v in value.values()):
            count = lengths.pop()
            return [{k: v[i] for k, v in value.items()} for i in range(count)], params
        return [value], params
    return (value if isinstance(value, list) else [value]), params


def parse_csv(text: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames:
        raise BadRequest("the CSV body has no header row")
    return list(reader)


def _text(row, task: str, *names: str) -> str:
    """The text of one row: a string, or the value of the first named column, or a row's only column."""
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        for name in names:
            if isinstance(row.get(name), str):
                return row[name]
        if len(row) == 1 and isinstance(next(iter(row.values())), str):
            return next(iter(row.values()))
    raise BadRequest(f"{task}: each input must be a text (or a row with one text column); got {json.dumps(row)[:80]}")


def _texts(rows: list, task: str, *names: str) -> list[str]:
    if not rows:
        raise BadRequest("no input rows")
    return [_text(row, task, *names) for row in rows]


def _labels(value) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return [str(v) for v in json.loads(text)]
            except ValueError:
                pass
        return [part.strip() for part in text.split(",") if part.strip()]
    raise BadRequest("'candidate_labels' must be a list of labels or a comma-separated text")


def _set_params(message, params: dict, names) -> None:
    """Pipeline parameters from `params` onto the gRPC request; any other name is refused."""
    for name, value in params.items():
        if name not in names:
            raise BadRequest(f"unsupported parameter '{name}' for this task (supported: {', '.join(sorted(names))})")
        field = message.DESCRIPTOR.fields_by_name[name]
        try:
            if field.label == field.LABEL_REPEATED:
                getattr(message, name).extend(value if isinstance(value, list) else [value])
            elif field.message_type is not None:
                getattr(message, name).values.extend(value if isinstance(value, list) else [value])
            else:
                setattr(message, name, value)
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"parameter '{name}': {exc}") from None


# ---------------------------------------------------------------- the routes


class MlflowRoutes:
    def __init__(self, servicer, health):
        self.servicer = servicer
        self.health = health

    def routes(self) -> list[Route]:
        return [Route("/invocations", self.invocations, methods=["POST"]),
                Route("/ping", self.ping, methods=["GET"]),
                Route("/health", self.ping, methods=["GET"]),
                Route("/version", self.version, methods=["GET"])]

    async def ping(self, _request: Request) -> Response:
        return Response("\n", 200 if self.health.serving else 503, media_type="application/json")

    async def version(self, _request: Request) -> Response:
        return Response(dumps(_version()), media_type="application/json")

    async def invocations(self, request: Request) -> Response:
        media, _, options = (request.headers.get("content-type") or "").partition(";")
        media = media.strip().lower()
        charset = options.strip().lower()
        if charset and charset not in ("charset=utf-8", "charset=utf8"):
            return Response("The scoring server only supports UTF-8", 415, media_type="text/plain")
        if media not in ("application/json", "text/csv"):
            return Response(f"This predictor only supports the following content types: application/json, "
                            f"text/csv. Got '{media}'.", 415, media_type="text/plain")
        context = HttpCallContext(request.scope["state"]["request_id"])
        try:
            raw = (await read_body(request)).decode("utf-8")
            if media == "text/csv":
                return await self._predict(parse_csv(raw), {}, context)
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise BadRequest(f"Ensure that input is a valid JSON formatted string. Error: {exc}") from None
            if not isinstance(body, dict):
                raise BadRequest("The input must be a JSON dictionary with exactly one of the input fields "
                                 f"{', '.join(FORMATS)}")
            unified = self._unified_llm(body, context)
            if unified is not None:
                return Response(dumps([await unified]), media_type="application/json")
            rows, params = parse_json(body)
            return await self._predict(rows, params, context)
        except BadRequest as exc:
            return _error(exc.status, exc.message)
        except UnicodeDecodeError as exc:
            return _error(400, f"Ensure that input is valid UTF-8. Error: {exc}")
        except CallFailed as exc:
            return _error(exc.http_status, exc.message)

    # ------------------------------------------------------------ tasks

    @property
    def _task(self) -> str:
        return self.servicer.dep.task

    @property
    def _inference_task(self) -> str:
        return self.servicer.dep.model_dir.inference_task

    def _unified_llm(self, body: dict, context):
        """llm/v1 models take OpenAI's payload unwrapped (and answer a bare list)."""
        if any(key in body for key in FORMATS):
            return None
        if self._inference_task == "llm/v1/chat" and "messages" in body:
            return self._chat(body, context)
        if self._inference_task == "llm/v1/completions" and "prompt" in body:
            return self._complete(body, context)
        return None

    async def _chat(self, row: dict, context) -> dict:
        request, stream, _ = chat_request(row)
        if stream:
            raise BadRequest("stream is not supported by /invocations (use /v1/chat/completions)")
        answer = await self.servicer.Chat(request, context)
        return {"id": answer.id, "object": answer.object, "created": answer.created, "model": answer.model,
                "choices": [{"index": c.index, "message": {"role": c.message.role, "content": c.message.content},
                             "finish_reason": c.finish_reason} for c in answer.choices],
                "usage": _usage(answer.usage)}

    async def _complete(self, row: dict, context) -> dict:
        request, stream, _ = completion_request(row)
        if stream:
            raise BadRequest("stream is not supported by /invocations (use /v1/completions)")
        answer = await self.servicer.Complete(request, context)
        return {"id": answer.id, "object": answer.object, "created": answer.created, "model": answer.model,
                "choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason}
                            for c in answer.choices],
                "usage": _usage(answer.usage)}

    async def _predict(self, rows: list, params: dict, context) -> Response:
        task, inference = self._task, self._inference_task
        if inference in ("llm/v1/chat", "llm/v1/completions"):
            one = self._chat if inference == "llm/v1/chat" else self._complete
            answers = await asyncio.gather(*(one({**_row_dict(row, inference), **params}, context) for row in rows))
            return _predictions(list(answers))
        handler = TASKS.get(task)
        if handler is None:
            raise BadRequest(f"/invocations does not serve the {task or 'unknown'} task")
        return _predictions(await handler(self, rows, params, context))

    async def _classify(self, rows, params, context):
        request = pb.ClassifyRequest()
        for row in rows:
            if isinstance(row, dict) and "text_pair" in row:
                request.texts.append(_text(row, "text-classification", "text"))
                request.text_pairs.append(str(row["text_pair"]))
            else:
                request.texts.append(_text(row, "text-classification", "text"))
        if request.text_pairs and len(request.text_pairs) != len(request.texts):
            raise BadRequest("either every row has a text_pair or none does")
        _set_params(request, params, {"top_k", "function_to_apply", "truncation"})
        answer = await self.servicer.Classify(request, context)
        results = [[{"label": s.label, "score": s.score} for s in row.labels] for row in answer.results]
        # MLflow's shape: one {label, score} record per text; with top_k, a list of them per text.
        return results if request.HasField("top_k") else [row[0] for row in results]

    async def _classify_tokens(self, rows, params, context):
        request = pb.ClassifyTokensRequest(texts=_texts(rows, "token-classification", "text", "inputs"))
        _set_params(request, params, {"aggregation_strategy", "ignore_labels", "truncation"})
        answer = await self.servicer.ClassifyTokens(request, context)
        return [",".join(e.entity_group or e.entity for e in row.entities) for row in answer.results]

    async def _fill_mask(self, rows, params, context):
        request = pb.FillMaskRequest(texts=_texts(rows, "fill-mask", "text", "inputs"))
        _set_params(request, params, {"top_k", "targets", "truncation"})
        answer = await self.servicer.FillMask(request, context)
        top_k = request.HasField("top_k")
        out = []
        for result in answer.results:
            per_mask = [[c.token_str.strip() for c in mask.candidates] if top_k
                        else mask.candidates[0].token_str.strip() for mask in result.masks]
            out.append(per_mask[0] if len(per_mask) == 1 else per_mask)
        return out

    async def _embed(self, rows, params, context):
        request = pb.EmbedRequest(texts=_texts(rows, "feature-extraction", "text", "inputs"), pooling="none")
        _set_params(request, {k: v for k, v in params.items()}, {"pooling", "normalize", "truncation"})
        answer = await self.servicer.Embed(request, context)
        vectors = [_tensor_list(t) for t in answer.embeddings]
        # MLflow answers one input's vectors alone; several inputs get one entry each.
        return vectors[0] if len(vectors) == 1 else vectors

    async def _zero_shot(self, rows, params, context):
        async def one(row):
            if not isinstance(row, dict) or "sequences" not in row or "candidate_labels" not in row:
                raise BadRequest("zero-shot-classification rows need 'sequences' and 'candidate_labels'")
            sequences = row["sequences"] if isinstance(row["sequences"], list) else [row["sequences"]]
            request = pb.ZeroShotClassifyRequest(texts=[str(s) for s in sequences],
                                                 candidate_labels=_labels(row["candidate_labels"]))
            template = row.get("hypothesis_template")
            merged = dict(params)
            if template:
                merged.setdefault("hypothesis_template", template)
            _set_params(request, merged, {"hypothesis_template", "multi_label"})
            return await self.servicer.ZeroShotClassify(request, context)

        answers = await asyncio.gather(*(one(row) for row in rows))
        return [{"sequence": r.sequence, "labels": label, "scores": score}
                for answer in answers for r in answer.results for label, score in zip(r.labels, r.scores, strict=True)]

    async def _answer_question(self, rows, params, context):
        request = pb.AnswerQuestionRequest()
        for row in rows:
            if not isinstance(row, dict) or not {"question", "context"} <= set(row):
                raise BadRequest("question-answering rows need 'question' and 'context'")
            request.inputs.add(question=str(row["question"]), context=str(row["context"]))
        _set_params(request, params, set(request.DESCRIPTOR.fields_by_name) - {"inputs", "adapter"})
        answer = await self.servicer.AnswerQuestion(request, context)
        return [row.answers[0].answer if row.answers else "" for row in answer.results]

    async def _generate(self, rows, params, context):
        prompts = _texts(rows, "text-generation", "prompt", "text", "inputs")
        parameters = pb.GenerateTextParameters()
        _set_params(parameters, params, set(parameters.DESCRIPTOR.fields_by_name))

        async def one(prompt):
            answer = await self.servicer.GenerateText(pb.GenerateTextRequest(prompt=prompt, parameters=parameters),
                                                      context)
            return answer.generated_text.strip()  # MLflow strips the answer's surrounding whitespace

        return list(await asyncio.gather(*(one(p) for p in prompts)))


def _row_dict(row, inference: str) -> dict:
    if isinstance(row, dict):
        return {k: v for k, v in row.items() if v is not None}
    key = "messages" if inference == "llm/v1/chat" else "prompt"
    return {key: row}


def _usage(usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def _tensor_list(tensor: pb.Tensor) -> list:
    import numpy as np

    dtype = "<f2" if tensor.datatype == "FP16" else "<f4"
    return np.frombuffer(tensor.data, dtype).astype(np.float64).reshape(tuple(tensor.shape)).tolist()


TASKS = {
    "text-classification": MlflowRoutes._classify,
    "token-classification": MlflowRoutes._classify_tokens,
    "fill-mask": MlflowRoutes._fill_mask,
    "feature-extraction": MlflowRoutes._embed,
    "zero-shot-classification": MlflowRoutes._zero_shot,
    "question-answering": MlflowRoutes._answer_question,
    "text-generation": MlflowRoutes._generate,
    "text2text-generation": MlflowRoutes._generate,
    "summarization": MlflowRoutes._generate,
}
