"""Routing views: the few request fields routing reads, decoded straight from the body bytes.

Each endpoint has a Struct holding only what routing needs; msgspec skips every other key without
building objects for it. Type errors in these fields become OpenAI-shaped 400s here, so nothing
malformed reaches the router. The body itself is forwarded as the client sent it.

msgspec allows one array type per union, so fields that SGLang accepts in several list shapes
(``prompt``: str, [str], [int], [[int]]) are decoded by trying one view per shape, cheapest first;
only a batch request pays for a second attempt.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import msgspec

from gateway.errors import GatewayError, bad_request
from gateway.routing import RoutingRequest

__all__ = ["Endpoint", "decode_view"]

_PATH_IN_ERROR = re.compile(
    r"at `\$\.([A-Za-z_][A-Za-z0-9_]*)|missing required field `([A-Za-z_][A-Za-z0-9_]*)`"
)


class _Sampling(msgspec.Struct):
    max_new_tokens: int | None = None


class _ChatView(msgspec.Struct):
    messages: list[dict[str, Any]]
    model: str | None = None
    stream: bool | None = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


class _CompletionTextView(msgspec.Struct):
    prompt: str | list[str]
    model: str | None = None
    stream: bool | None = False
    max_tokens: int | None = None


class _CompletionIdsView(msgspec.Struct):
    prompt: list[int]
    model: str | None = None
    stream: bool | None = False
    max_tokens: int | None = None


class _CompletionIdBatchView(msgspec.Struct):
    prompt: list[list[int]]
    model: str | None = None
    stream: bool | None = False
    max_tokens: int | None = None


class _GenerateView(msgspec.Struct):
    text: str | list[str] | None = None
    input_ids: list[int] | None = None
    model: str | None = None
    stream: bool | None = False
    sampling_params: _Sampling | list[_Sampling] | None = None


class _GenerateIdBatchView(msgspec.Struct):
    input_ids: list[list[int]]
    text: str | list[str] | None = None
    model: str | None = None
    stream: bool | None = False
    sampling_params: _Sampling | list[_Sampling] | None = None


class Endpoint:
    """One proxied endpoint: its routing name, upstream path and view decoders (resolved once)."""

    __slots__ = ("decoders", "name", "path")

    def __init__(self, name: str, path: str, views: tuple[type[msgspec.Struct], ...]) -> None:
        self.name = name
        self.path = path
        self.decoders = tuple(msgspec.json.Decoder(view) for view in views)


CHAT = Endpoint("chat", "/v1/chat/completions", (_ChatView,))
COMPLETION = Endpoint(
    "completion", "/v1/completions", (_CompletionTextView, _CompletionIdsView, _CompletionIdBatchView)
)
GENERATE = Endpoint("generate", "/generate", (_GenerateView, _GenerateIdBatchView))


def _param_of(error: msgspec.ValidationError) -> str | None:
    match = _PATH_IN_ERROR.search(str(error))
    return (match.group(1) or match.group(2)) if match else None


def _decode(endpoint: Endpoint, body: bytes) -> msgspec.Struct:
    first_error: msgspec.ValidationError | None = None
    for decoder in endpoint.decoders:
        try:
            view: msgspec.Struct = decoder.decode(body)
        except msgspec.ValidationError as exc:
            if first_error is None:
                first_error = exc
                # Only a shape mismatch of the multi-shape field is worth another view.
                if _param_of(exc) not in ("prompt", "input_ids"):
                    break
            continue
        except msgspec.DecodeError as exc:
            raise bad_request(f"Request body is not valid JSON: {exc}", code="invalid_json") from None
        except UnicodeDecodeError as exc:
            # msgspec validates UTF-8 only when it builds a str, and raises Python's own error then.
            raise bad_request(
                f"Request body is not valid JSON: a string is not valid UTF-8 ({exc.reason})",
                code="invalid_json",
            ) from None
        return view
    assert first_error is not None
    message = str(first_error)
    if message.startswith("Expected `object`") and " - at `$" not in message:
        raise bad_request("Request body must be a JSON object", code="invalid_json")
    raise bad_request(f"Invalid request: {message}", param=_param_of(first_error))


def _positive(value: int | None, param: str) -> int | None:
    if value is not None and value < 0:
        raise bad_request(f"{param} must be non-negative, got {value}", param=param)
    return value


def decode_view(endpoint: Endpoint, body: bytes, default_model: Callable[[], str | None]) -> RoutingRequest:
    """The routing view of ``body`` for ``endpoint``; raises GatewayError (400) on bad input.

    ``default_model()`` names the model for a request without one (the only model served), or is
    None when the gateway serves several and the request must say which; it is called only then,
    and may raise a GatewayError itself (a 503 while no model is served at all).
    """
    view = _decode(endpoint, body)
    model: str | None = getattr(view, "model", None)
    if model is None:
        model = default_model()
        if model is None:
            raise bad_request("`model` is required: this gateway serves several models", param="model")
    stream = bool(getattr(view, "stream", False))
    if isinstance(view, _ChatView):
        max_new = view.max_completion_tokens if view.max_completion_tokens is not None else view.max_tokens
        return RoutingRequest(
            model=model,
            endpoint=endpoint.name,
            messages=view.messages,
            max_new_tokens=_positive(max_new, "max_tokens"),
            stream=stream,
        )
    if isinstance(view, _CompletionTextView | _CompletionIdsView | _CompletionIdBatchView):
        return RoutingRequest(
            model=model,
            endpoint=endpoint.name,
            prompt=view.prompt,
            max_new_tokens=_positive(view.max_tokens, "max_tokens"),
            stream=stream,
        )
    if isinstance(view, _GenerateView | _GenerateIdBatchView):
        if view.text is None and view.input_ids is None:
            raise bad_request("Either text or input_ids should be provided", param="text")
        sampling = view.sampling_params
        if isinstance(sampling, list):
            sampling = sampling[0] if sampling else None
        max_new = sampling.max_new_tokens if sampling is not None else None
        return RoutingRequest(
            model=model,
            endpoint=endpoint.name,
            text=view.text,
            input_ids=view.input_ids,
            max_new_tokens=_positive(max_new, "max_new_tokens"),
            stream=stream,
        )
    raise GatewayError(500, "no routing view for endpoint", "server_error")  # unreachable by construction


def is_batch(request: RoutingRequest) -> bool:
    """A native /generate batch (list of prompts): the server spreads it over its ranks itself."""
    source = request.input_ids if request.input_ids is not None else request.text
    return isinstance(source, list) and bool(source) and isinstance(source[0], list | str)
