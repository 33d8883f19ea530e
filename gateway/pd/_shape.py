"""What PD needs to know about a request beyond its routing view: how many sequences it fans out
to (each needs its own bootstrap room) and whether it asked for logprobs (prefill's input logprobs
are merged into the response).

Rooms per request, as sgl-model-gateway's pd_router assigns them and SGLang consumes them
(``io_struct.GenerateReqInput._normalize_bootstrap_params``):

- one prompt, n = 1: a scalar room;
- a batch of B prompts (``/generate`` text or input_ids list, ``/v1/completions`` prompt list) and/or
  n > 1 choices: a list of B × n distinct rooms. sgl-model-gateway sends n rooms for chat n > 1 and
  B rooms for a batch; SGLang repeats a list ``parallel_sample_num`` times, so a batch with n > 1 given
  only B rooms would reuse each room for all n samples. B × n rooms keeps every sequence distinct.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.routing import RoutingRequest

__all__ = ["RequestShape", "request_shape"]


class _Sampling(msgspec.Struct):
    n: Any = None


class _GenerateExtras(msgspec.Struct):
    sampling_params: Any = None
    return_logprob: Any = None


class _OpenAIExtras(msgspec.Struct):
    n: Any = None
    logprobs: Any = None
    echo: Any = None


_GENERATE = msgspec.json.Decoder(_GenerateExtras)
_OPENAI = msgspec.json.Decoder(_OpenAIExtras)


class RequestShape(msgspec.Struct, frozen=True):
    # Sequences the request fans out to on the server (batch size × n).
    sequences: int
    # Whether the bootstrap fields must be lists (one entry per sequence).
    listed: bool
    # /generate asked for logprobs: prefill's input_token_logprobs go into the response.
    merge_logprobs: bool


def _count(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 1:
        return value
    return 1


def _batch_size(request: RoutingRequest) -> int:
    source = request.input_ids if request.input_ids is not None else request.text
    if source is None:
        source = request.prompt
    if isinstance(source, list) and source and isinstance(source[0], list | str):
        return len(source)
    return 1


def _truthy(value: Any) -> bool:
    if isinstance(value, list):
        return any(v is True for v in value)
    return value is True


def request_shape(endpoint: str, body: bytes, request: RoutingRequest) -> RequestShape:
    """The PD shape of an already validated request (``endpoint`` is chat, completion or generate).

    Only ``n`` and the logprob flags are decoded here; a malformed value of either counts as 1 /
    false, and the server then rejects the request with its own message.
    """
    batch = _batch_size(request) if request.messages is None else 1
    n = 1
    merge = False
    try:
        if endpoint == "generate":
            extras = _GENERATE.decode(body)
            sampling = extras.sampling_params
            if isinstance(sampling, dict):
                n = _count(sampling.get("n"))
            elif isinstance(sampling, list) and sampling and isinstance(sampling[0], dict):
                n = _count(sampling[0].get("n"))
            merge = _truthy(extras.return_logprob)
        else:
            openai = _OPENAI.decode(body)
            n = _count(openai.n)
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    sequences = batch * n
    listed = sequences > 1 or _is_listed_batch(request)
    return RequestShape(sequences=sequences, listed=listed, merge_logprobs=merge)


def _is_listed_batch(request: RoutingRequest) -> bool:
    """A one-element batch (``"text": ["a"]``) is still a batch: SGLang wants list fields for it."""
    source = request.input_ids if request.input_ids is not None else request.text
    if source is None and request.endpoint == "completion":
        source = request.prompt
    return isinstance(source, list) and bool(source) and isinstance(source[0], list | str)
