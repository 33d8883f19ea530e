"""Errors the gateway itself answers with, all in OpenAI's shape.

Every body the gateway makes on failure is ``{"error": {"message", "type", "param", "code"}}`` so an
OpenAI SDK client raises its usual typed exception (``BadRequestError``, ``NotFoundError``...) with
our message. Upstream errors (an SGLang 4xx) are passed through as the server wrote them.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "GatewayError",
    "bad_request",
    "body_too_large",
    "error_body",
    "internal_error",
    "method_not_allowed",
    "model_not_found",
    "no_healthy_worker",
    "no_model_yet",
    "not_found",
    "request_body_timeout",
    "sse_error_event",
    "upstream_failed",
]


class _ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail


_ENCODER = msgspec.json.Encoder()


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> bytes:
    """The JSON bytes of an OpenAI-shaped error."""
    return _ENCODER.encode(_ErrorBody(_ErrorDetail(message=message, type=type_, param=param, code=code)))


def sse_error_event(message: str, type_: str = "server_error", code: str | None = None) -> bytes:
    """What ends a stream that failed after its first byte: an error event, then [DONE]."""
    return b"data: " + error_body(message, type_, code=code) + b"\n\ndata: [DONE]\n\n"


def mid_stream_failure_event(server: str, exc: Exception, *, timed_out: bool) -> bytes:
    """The event that ends a stream whose upstream ``server`` failed after the client's first byte."""
    return sse_error_event(
        f"The {server} serving this request failed mid-stream ({type(exc).__name__}: {exc})",
        "server_error",
        "upstream_timeout" if timed_out else "upstream_disconnected",
    )


class GatewayError(Exception):
    """A failure answered with ``status`` and an OpenAI-shaped body (plus optional headers)."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> bytes:
        return error_body(self.message, self.type, param=self.param, code=self.code)


def bad_request(
    message: str, *, param: str | None = None, code: str | None = "invalid_request"
) -> GatewayError:
    return GatewayError(400, message, "invalid_request_error", param=param, code=code)


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model '{model}' does not exist",
        "invalid_request_error",
        param="model",
        code="model_not_found",
    )


def not_found(path: str) -> GatewayError:
    return GatewayError(404, f"Unknown route {path}", "invalid_request_error", code="not_found")


def method_not_allowed(method: str, path: str, allowed: tuple[str, ...]) -> GatewayError:
    return GatewayError(
        405,
        f"Method {method} is not allowed on {path}; use {', '.join(allowed)}",
        "invalid_request_error",
        code="method_not_allowed",
        headers=(("allow", ", ".join(allowed)),),
    )


def body_too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"Request body is larger than the gateway's limit of {limit} bytes",
        "invalid_request_error",
        code="request_too_large",
    )


def request_body_timeout(timeout_s: float) -> GatewayError:
    return GatewayError(
        408,
        f"The request body did not arrive within {timeout_s:g} s",
        "invalid_request_error",
        code="request_timeout",
        # The rest of the body may still come: the connection cannot be reused.
        headers=(("connection", "close"),),
    )


def no_healthy_worker(model: str, retry_after_s: int, *, server: str = "worker") -> GatewayError:
    """None of the model's servers (or of its ``server`` kind: "prefill server"...) is healthy."""
    return GatewayError(
        503,
        f"No healthy {server} is serving model '{model}' right now; retry later",
        "server_error",
        code="no_healthy_worker",
        headers=(("retry-after", str(retry_after_s)),),
    )


def no_model_yet(retry_after_s: int) -> GatewayError:
    """No server has been discovered yet, so a request without ``model`` has none to default to."""
    return GatewayError(
        503,
        "No healthy server has been discovered yet, so no model is served; retry later",
        "server_error",
        code="no_healthy_worker",
        headers=(("retry-after", str(retry_after_s)),),
    )


def upstream_failed(message: str, *, timeout: bool = False) -> GatewayError:
    if timeout:
        return GatewayError(504, message, "server_error", code="upstream_timeout")
    return GatewayError(502, message, "server_error", code="upstream_unavailable")


def upstream_overloaded(message: str, retry_after_s: int) -> GatewayError:
    """Every server tried answered 503 (SGLang's "too busy"): the client should come back later."""
    return GatewayError(
        503,
        message,
        "server_error",
        code="upstream_overloaded",
        headers=(("retry-after", str(retry_after_s)),),
    )


def internal_error(exc: BaseException) -> GatewayError:
    return GatewayError(
        500,
        f"Internal gateway error ({type(exc).__name__}); the request was not completed",
        "server_error",
        code="internal_error",
    )
