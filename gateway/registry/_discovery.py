"""Learning what a server is from its info endpoints."""

from __future__ import annotations

import asyncio

import msgspec

from backends.sglang import (
    ModelInfo,
    ModelList,
    ServerInfo,
    parse_model_info,
    parse_model_list,
    parse_server_info,
)
from gateway.registry._models import (
    DEFAULT_DECODE_STEP_S,
    DEFAULT_NODE_PREFILL_TOKENS_PER_S,
    UNKNOWN_CAPACITY_TOKENS,
    Worker,
    WorkerSpec,
    normalise_url,
)
from gateway.upstream import Transport, UpstreamError, UpstreamPoolTimeout, UpstreamRequest
from policies.types import Role

_NOT_THERE = frozenset({404, 405})
_ACCEPT_JSON = [("accept", "application/json")]


class DiscoveryError(Exception):
    """The server could not be asked, or its answer made no sense."""


class GatewaySaturated(DiscoveryError):
    """Every upstream connection of the gateway was busy: the server was not asked, so nothing is
    known about its health (counting this as a failure would take healthy servers out exactly when
    the gateway is busiest)."""


async def http_get(transport: Transport, url: str, timeout_s: float) -> tuple[int, bytes]:
    """GET ``url``. The transport bounds each step by ``timeout_s``; the outer bound only guards
    against a transport that does not (it is loose enough to let a pool wait surface as such)."""
    try:
        async with asyncio.timeout(3 * timeout_s + 1.0):
            response = await transport.send(UpstreamRequest("GET", url, _ACCEPT_JSON, b"", timeout=timeout_s))
            try:
                body = await response.aread()
            finally:
                await response.aclose()
    except TimeoutError as exc:
        raise DiscoveryError(f"GET {url} timed out after {timeout_s}s") from exc
    except UpstreamPoolTimeout as exc:
        raise GatewaySaturated(f"GET {url} not sent: {exc}") from exc
    except UpstreamError as exc:
        raise DiscoveryError(f"GET {url} failed: {exc}") from exc
    return response.status, body


async def _first_found(
    transport: Transport, base: str, paths: tuple[str, ...], timeout_s: float
) -> bytes | None:
    """The body of the first path that exists (404/405 means try the next); None if none does."""
    for path in paths:
        status, body = await http_get(transport, base + path, timeout_s)
        if status in _NOT_THERE:
            continue
        if status != 200:
            raise DiscoveryError(f"GET {base}{path} answered {status}")
        return body
    return None


def _role(mode: str | None, spec: WorkerSpec) -> Role:
    if mode == "prefill":
        return Role.PREFILL
    if mode == "decode":
        return Role.DECODE
    return spec.role


async def discover(spec: WorkerSpec, transport: Transport, timeout_s: float) -> Worker:
    """Build a Worker from /server_info (or /get_server_info), /model_info and /v1/models.

    Only /server_info is required; the other two fill in the model path and context length when a
    server offers them.
    """
    base = normalise_url(spec.url)
    raw_info = await _first_found(transport, base, ("/server_info", "/get_server_info"), timeout_s)
    if raw_info is None:
        raise DiscoveryError(f"{base} has neither /server_info nor /get_server_info")
    try:
        info: ServerInfo = parse_server_info(raw_info)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DiscoveryError(f"{base}/server_info is not valid: {exc}") from exc

    model_info: ModelInfo | None = None
    models: ModelList | None = None
    try:
        raw = await _first_found(transport, base, ("/model_info", "/get_model_info"), timeout_s)
        model_info = parse_model_info(raw) if raw is not None else None
        raw = await _first_found(transport, base, ("/v1/models",), timeout_s)
        models = parse_model_list(raw) if raw is not None else None
    except (DiscoveryError, msgspec.DecodeError, msgspec.ValidationError):
        # Optional detail: a server that does not serve it is still usable.
        pass

    served = spec.model or info.served_name()
    base_card = next((card for card in models.data if card.parent is None), None) if models else None
    if served is None and base_card is not None:
        served = base_card.id
    if served is None and model_info is not None:
        served = model_info.model_path
    context_length = info.context_length
    if base_card is not None and base_card.max_model_len is not None:
        context_length = base_card.max_model_len

    dp_size = info.effective_dp_size()
    role = _role(info.disaggregation_mode, spec)
    bootstrap_port = spec.bootstrap_port
    if bootstrap_port is None and role is Role.PREFILL:
        bootstrap_port = info.disaggregation_bootstrap_port
    prefill_per_rank = info.prefill_tokens_per_s or DEFAULT_NODE_PREFILL_TOKENS_PER_S / dp_size
    return Worker(
        url=base,
        model=served or "default",
        role=role,
        dp_size=dp_size,
        page_size=info.page_size or 1,
        max_total_num_tokens=info.max_total_num_tokens or UNKNOWN_CAPACITY_TOKENS,
        version=info.version or "",
        bootstrap_port=bootstrap_port,
        healthy=False,
        context_length=context_length,
        prefill_tokens_per_s=prefill_per_rank,
        decode_step_s=info.decode_step_s or DEFAULT_DECODE_STEP_S,
        model_path=info.model_path or (model_info.model_path if model_info else None),
        max_running_requests=info.max_running_requests,
        discovered=True,
    )


def undiscovered(spec: WorkerSpec) -> Worker:
    """A placeholder for a configured server that has not answered yet (never healthy)."""
    return Worker(
        url=normalise_url(spec.url),
        model=spec.model or "default",
        role=spec.role,
        bootstrap_port=spec.bootstrap_port,
        healthy=False,
        discovered=False,
    )
