"""Prefill/decode disaggregation over SGLang's bootstrap protocol.

A model may be served by a prefill pool and a decode pool (SGLang ``--disaggregation-mode
prefill|decode``), possibly beside regular workers. For each request the gateway picks a prefill
target by prefix affinity and queue (a Router with role PREFILL and the prefix_aware policy) and a
decode target by load (role DECODE, ``policies.decode_load``), gives the request a fresh random
63-bit bootstrap room per sequence, and sends it to both servers at once: the prefill computes the
prompt's KV and ships it to the decode, whose response goes back to the client.

    pd = make_pd_forwarder(registry, transport, PDSettings(direct_below_tokens=256))
    await pd.start()
    if pd.serves(request.model):
        handled = await pd.forward(endpoint=endpoint, request=request, body=body, headers=headers,
                                   send=send, client=exchange, span=span)
        if handled:
            return            # answered (or a GatewayError was raised before any byte)
        # else: take the regular path (conditional disaggregation, or fallback when a pool is down)
    await pd.aclose()

CLI helper: ``pd_worker_specs([["http://p:30000", "8998"]], ["http://d:30001"])`` turns
``--prefill URL [BOOTSTRAP_PORT]`` / ``--decode URL`` flags into registry WorkerSpecs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, cast

from gateway.pd._forwarder import ClientState, EndpointLike, PDForwarder, PDRouterLike, Send, SpanLike
from gateway.pd._rooms import RoomAllocator
from gateway.pd._settings import PDSettings
from gateway.pd._shape import RequestShape, request_shape
from gateway.registry import Worker, WorkerSpec
from gateway.routing import RegistryLike, Router
from gateway.state import MemoryStore, StateStore
from gateway.state.redis_store import RedisStore
from gateway.upstream import Transport
from policies.decode_load import DecodeLoad
from policies.prefix_aware import PrefixAware
from policies.types import Role

__all__ = [
    "ClientState",
    "EndpointLike",
    "PDForwarder",
    "PDRouterLike",
    "PDSettings",
    "RequestShape",
    "RoomAllocator",
    "Send",
    "SpanLike",
    "make_pd_forwarder",
    "pd_worker_specs",
    "request_shape",
]


def make_pd_forwarder(
    registry: RegistryLike[Worker],
    transport: Transport,
    settings: PDSettings | None = None,
    *,
    redis_url: str | None = None,
    seed: int | None = None,
    lease_ttl_s: float = 120.0,
    on_connect_failure: Callable[[str], None] | None = None,
) -> PDForwarder:
    """A PDForwarder with its two routers (prefix_aware over prefill, decode_load over decode)."""
    settings = settings if settings is not None else PDSettings()
    mode = cast(Literal["least", "power_of_two"], settings.decode_mode)
    prefill_router = Router(
        registry,
        _store(redis_url, lease_ttl_s, Role.PREFILL),
        PrefixAware(),
        seed=seed,
        role=Role.PREFILL,
        lease_renew_interval_s=lease_ttl_s / 3,
    )
    decode_router = Router(
        registry,
        _store(redis_url, lease_ttl_s, Role.DECODE),
        DecodeLoad(mode=mode, kv_high=settings.decode_kv_high),
        seed=None if seed is None else seed + 1,
        role=Role.DECODE,
        lease_renew_interval_s=lease_ttl_s / 3,
    )
    return PDForwarder(
        registry,
        transport,
        prefill_router=prefill_router,
        decode_router=decode_router,
        settings=settings,
        on_connect_failure=on_connect_failure,
    )


def _store(redis_url: str | None, lease_ttl_s: float, role: Role) -> StateStore:
    """Each PD router keeps its own state; in Redis under its own key prefix, so the prefill index
    and the decode leases never mix with each other or with the regular router's."""
    if redis_url is None:
        return MemoryStore(lease_ttl_s=lease_ttl_s)
    return RedisStore(redis_url, lease_ttl_s=lease_ttl_s, key_prefix=f"cachet:pd-{role.value}")


def pd_worker_specs(prefill: Sequence[Sequence[str]], decode: Sequence[str]) -> list[WorkerSpec]:
    """WorkerSpecs from ``--prefill URL [BOOTSTRAP_PORT]`` (repeatable) and ``--decode URL`` flags.

    Without a port, the prefill's bootstrap port is discovered from its /server_info
    (``disaggregation_bootstrap_port``), else SGLang's default 8998. Raises ValueError on bad input.
    """
    specs: list[WorkerSpec] = []
    for args in prefill:
        if not 1 <= len(args) <= 2:
            raise ValueError(f"--prefill takes URL [BOOTSTRAP_PORT], got {' '.join(args)!r}")
        url = args[0]
        _check_url(url, "--prefill")
        port: int | None = None
        if len(args) == 2 and args[1].lower() not in ("none", ""):
            try:
                port = int(args[1])
            except ValueError:
                raise ValueError(
                    f"--prefill {url}: bootstrap port must be an integer, got {args[1]!r}"
                ) from None
            if not 0 < port < 65536:
                raise ValueError(f"--prefill {url}: bootstrap port must be in 1..65535, got {port}")
        specs.append(WorkerSpec(url=url, role=Role.PREFILL, bootstrap_port=port))
    for url in decode:
        _check_url(url, "--decode")
        specs.append(WorkerSpec(url=url, role=Role.DECODE))
    return specs


def _check_url(url: str, flag: str) -> None:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{flag} URL must start with http:// or https://, got {url!r}")
