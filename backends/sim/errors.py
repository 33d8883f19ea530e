"""SGLang's error bodies, byte for byte where the wire-protocol reference gives them."""

from __future__ import annotations

from typing import Any

from backends.sim.asgi import encode_json


class SchemaError(Exception):
    """The body does not parse or does not fit the pydantic model: FastAPI's RequestValidationError (400)."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors)
        self.errors = errors


def schema_error(loc: tuple[str | int, ...], msg: str, value: Any, kind: str = "value_error") -> SchemaError:
    return SchemaError([{"type": kind, "loc": ("body", *loc), "msg": msg, "input": value}])


def validation_body(exc: SchemaError) -> bytes:
    """SGLang's RequestValidationError handler: `f"{str(exc)} {exc.errors()}"` in an ErrorResponse."""
    n = len(exc.errors)
    exc_str = f"{n} validation error{'s' if n != 1 else ''}:\n" + "".join(f"  {e!r}\n" for e in exc.errors)
    message = f"{exc_str} {exc.errors!r}"
    return encode_json(
        {"object": "error", "message": message, "type": "Bad Request", "param": None, "code": 400}
    )


def native_error_body(message: str) -> bytes:
    """/generate's `_create_error_response` for ValueErrors."""
    return encode_json({"error": {"message": message}})


def http_exception_body(message: str, status: int) -> bytes:
    """fastapi.HTTPException through SGLang's global handler (queue full, PD aborts...)."""
    return encode_json(
        {"object": "error", "message": message, "type": str(status), "param": None, "code": status}
    )


def openai_error_body(message: str, err_type: str, status: int) -> bytes:
    return encode_json(
        {"object": "error", "message": message, "type": err_type, "param": None, "code": status}
    )


def stream_error_payload(message: str, structured: bool) -> bytes:
    """The in-stream error chunk of /generate (structured since 2026-06-06)."""
    if structured:
        return encode_json(
            {"error": {"message": message, "type": "invalid_request_error", "code": 400, "retryable": False}}
        )
    return encode_json({"error": {"message": message}})


def openai_stream_error_payload(message: str, status: int) -> bytes:
    err_type = {400: "BadRequestError", 503: "SERVICE_UNAVAILABLE"}.get(status, "InternalServerError")
    return encode_json(
        {"error": {"object": "error", "message": message, "type": err_type, "param": None, "code": status}}
    )


NOT_FOUND = b'{"detail":"Not Found"}'
METHOD_NOT_ALLOWED = b'{"detail":"Method Not Allowed"}'
UNAUTHORIZED = b'{"error":"Unauthorized"}'
QUEUE_FULL = "The request queue is full."
