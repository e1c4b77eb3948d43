"""Reading JSON request bodies field by field, with errors that name the field."""

from __future__ import annotations

import json

from starlette.requests import Request

from splitserve_common.http_front import body_too_large


class BadRequest(Exception):
    """400 (or `status`) with a message naming the offending parameter."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


async def read_body(request: Request) -> bytes:
    """The whole body, refused with 413 past the guard's limit (bodies sent without Content-Length)."""
    limit = request.scope["state"]["max_body"]
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(body_too_large(limit), status=413, code="message_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_object(request: Request) -> dict:
    body = await read_body(request)
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest("the body must be a JSON object")
    return value


def dumps(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


class Fields:
    """A request object's fields, each read once with its type checked; `left_over()` lists the rest.

    JSON null counts as absent (OpenAI's clients send null for "not given").
    """

    def __init__(self, body: dict, where: str = ""):
        self.body = {k: v for k, v in body.items() if v is not None}
        self.where = where
        self.read: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.body

    def raw(self, name: str):
        self.read.add(name)
        return self.body.get(name)

    def _typed(self, name: str, kinds, what: str):
        value = self.raw(name)
        if value is None:
            return None
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _tuple(kinds)):
            raise BadRequest(f"'{self.where}{name}' must be {what}, got {json.dumps(value)[:80]}", name)
        return value

    def str(self, name: str) -> str | None:
        return self._typed(name, str, "a string")

    def bool(self, name: str) -> bool | None:
        return self._typed(name, bool, "a boolean")

    def int(self, name: str, low: int | None = None, high: int | None = None) -> int | None:
        value = self._typed(name, int, "an integer")
        return self._bounded(name, value, low, high)

    def float(self, name: str, low: float | None = None, high: float | None = None) -> float | None:
        value = self._typed(name, (int, float), "a number")
        return self._bounded(name, None if value is None else float(value), low, high)

    def _bounded(self, name, value, low, high):
        if value is not None and ((low is not None and value < low) or (high is not None and value > high)):
            bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
            raise BadRequest(f"'{self.where}{name}' must be in {bounds}, got {value}", name)
        return value

    def str_or_list(self, name: str) -> list[str] | None:
        value = self.raw(name)
        if value is None:
            return None
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise BadRequest(f"'{self.where}{name}' must be a string or a list of strings", name)

    def object(self, name: str) -> dict | None:
        return self._typed(name, dict, "an object")

    def left_over(self) -> list[str]:
        return [name for name in self.body if name not in self.read]

    def refuse_left_over(self) -> None:
        """An option this server does not implement is refused by name, never silently dropped."""
        extra = self.left_over()
        if extra:
            raise BadRequest(f"unsupported parameter '{self.where}{extra[0]}': this server does not implement it",
                             extra[0])


def _tuple(kinds) -> tuple:
    return kinds if isinstance(kinds, tuple) else (kinds,)
