"""Everything off the hot path, as litestar routes: health, readiness, models, admin.

Handlers are closures over the gateway's components, bound once when the app is built (no
dependency injection per request). Every error, including litestar's own 404/405/validation errors
and anything unexpected, is answered in OpenAI's error shape.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from litestar import Litestar, Request, Response, delete, get, post
from litestar.exceptions import HTTPException, MethodNotAllowedException, NotFoundException
from litestar.handlers import BaseRouteHandler
from litestar.params import FromPath, FromQuery

from gateway.errors import (
    GatewayError,
    bad_request,
    error_body,
    internal_error,
    method_not_allowed,
    model_not_found,
    not_found,
)
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.registry import Worker, WorkerSpec
from policies.types import Role

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["build_litestar"]

logger = logging.getLogger("cachet.gateway.http")

_ENCODER = msgspec.json.Encoder()
_JSON = "application/json"


def _json(content: Any, status: int = 200) -> Response[bytes]:
    return Response(content=_ENCODER.encode(content), status_code=status, media_type=_JSON)


def _error(error: GatewayError) -> Response[bytes]:
    return Response(
        content=error.body(), status_code=error.status, media_type=_JSON, headers=dict(error.headers)
    )


class _AddWorker(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    role: Literal["regular", "prefill", "decode"] = "regular"
    bootstrap_port: int | None = None
    model: str | None = None


class _ModelCard(msgspec.Struct):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "cachet"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class _ModelList(msgspec.Struct):
    data: list[_ModelCard]
    object: str = "list"


_ADD_WORKER = msgspec.json.Decoder(_AddWorker)
# OpenAI's ``code`` is a string (or null), never the HTTP status.
_HTTP_ERROR_CODES = {400: "invalid_request", 401: "unauthorized", 413: "request_too_large"}
_MISSING_PARAMETER = re.compile(r"Missing required \w+ parameter '([^']+)'")
_FIELD_IN_ERROR = re.compile(r"at `\$\.([A-Za-z_][A-Za-z0-9_]*)")


def _model_cards(workers: Sequence[Worker], created: int) -> dict[str, _ModelCard]:
    cards: dict[str, _ModelCard] = {}
    for worker in workers:
        if not worker.discovered and worker.model == "default":
            continue
        card = cards.get(worker.model)
        if card is None:
            cards[worker.model] = _ModelCard(
                id=worker.model, created=created, root=worker.model, max_model_len=worker.context_length
            )
        elif worker.context_length is not None:
            # A request must fit every server it may be routed to.
            known = card.max_model_len
            card.max_model_len = worker.context_length if known is None else min(known, worker.context_length)
    return cards


def _exception_handlers() -> dict[
    type[Exception] | int, Callable[[Request[Any, Any, Any], Any], Response[Any]]
]:
    def on_gateway_error(_request: Request[Any, Any, Any], exc: GatewayError) -> Response[bytes]:
        return _error(exc)

    def on_not_found(request: Request[Any, Any, Any], _exc: NotFoundException) -> Response[bytes]:
        return _error(not_found(request.url.path))

    def on_method(request: Request[Any, Any, Any], exc: MethodNotAllowedException) -> Response[bytes]:
        allow = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow") or ""
        allowed = tuple(m.strip() for m in allow.split(",") if m.strip())
        return _error(method_not_allowed(request.method, request.url.path, allowed or ("GET",)))

    def on_http(_request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = str(exc.detail)
        param: str | None = None
        # A bad query parameter: litestar names it only in ``extra``; a missing one in the detail.
        extra = exc.extra[0] if isinstance(exc.extra, list) and exc.extra else None
        if isinstance(extra, dict) and isinstance(extra.get("key"), str):
            param = extra["key"]
            message = f"Invalid query parameter {param!r}: {extra.get('message', message)}"
        else:
            missing = _MISSING_PARAMETER.search(message)
            param = missing.group(1) if missing else None
        return Response(
            content=error_body(message, kind, param=param, code=_HTTP_ERROR_CODES.get(exc.status_code)),
            status_code=exc.status_code,
            media_type=_JSON,
            headers=exc.headers or {},
        )

    def on_anything(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
        logger.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(internal_error(exc))

    return {
        GatewayError: on_gateway_error,
        NotFoundException: on_not_found,
        MethodNotAllowedException: on_method,
        HTTPException: on_http,
        Exception: on_anything,
    }


def build_litestar(
    gateway: Gateway, *, lifespan: Callable[[Litestar], AbstractAsyncContextManager[None]] | None = None
) -> Litestar:
    """The litestar app for every route but the three proxied ones."""
    config = gateway.config
    registry = gateway.registry
    router = gateway.router
    expected_token = f"Bearer {config.admin_token}" if config.admin_token else None

    def admin_guard(connection: Any, _handler: BaseRouteHandler) -> None:
        if expected_token is not None and connection.headers.get("authorization") != expected_token:
            raise GatewayError(
                401,
                "Admin API needs Authorization: Bearer <admin_token>",
                "invalid_request_error",
                code="unauthorized",
            )

    @get("/health", sync_to_thread=False)
    def health() -> Response[bytes]:
        return _json({"status": "ok"})

    @get("/readiness", sync_to_thread=False)
    def readiness() -> Response[bytes]:
        ready, healthy = gateway.readiness()
        if ready:
            return _json({"status": "ready", "healthy_workers": healthy})
        missing = [model for model, count in healthy.items() if count == 0]
        if missing:
            reason = f"no healthy worker for model(s) {', '.join(missing)}"
        else:
            reason = "no worker has been reached yet, so no model is known"
        return _error(
            GatewayError(
                503,
                f"Not ready: {reason}",
                "server_error",
                code="not_ready",
                headers=(("retry-after", str(config.retry_after_s)),),
            )
        )

    @get("/v1/models", sync_to_thread=False)
    def list_models() -> Response[bytes]:
        cards = _model_cards(registry.workers(healthy_only=False), int(time.time()))
        return _json(_ModelList(data=list(cards.values())))

    @get("/v1/models/{model:path}", sync_to_thread=False)
    def get_model(model: FromPath[str]) -> Response[bytes]:
        name = model.lstrip("/")
        card = _model_cards(registry.workers(healthy_only=False), int(time.time())).get(name)
        if card is None:
            raise model_not_found(name)
        return _json(card)

    @get("/admin/workers", guards=[admin_guard], sync_to_thread=False)
    def list_workers() -> Response[bytes]:
        return _json({"workers": list(registry.workers(healthy_only=False))})

    @post("/admin/workers", guards=[admin_guard], status_code=201)
    async def add_worker(request: Request[Any, Any, Any]) -> Response[bytes]:
        body = await request.body()
        try:
            entry = _ADD_WORKER.decode(body)
        except msgspec.ValidationError as exc:  # a subclass of DecodeError: caught first
            field = _FIELD_IN_ERROR.search(str(exc))
            raise bad_request(f"Invalid worker: {exc}", param=field.group(1) if field else None) from None
        except msgspec.DecodeError as exc:
            raise bad_request(f"Request body is not valid JSON: {exc}", code="invalid_json") from None
        except UnicodeDecodeError as exc:
            raise bad_request(
                f"Request body is not valid JSON: a string is not valid UTF-8 ({exc.reason})",
                code="invalid_json",
            ) from None
        if not entry.url.startswith(("http://", "https://")):
            raise bad_request("url must start with http:// or https://", param="url")
        if entry.url.startswith("https://") and not config.upstream_speaks_https:
            raise bad_request(
                f"this gateway's upstream transport ({config.upstream_transport}) speaks http:// only;"
                " restart it with --transport aiohttp to add https:// workers",
                param="url",
            )
        known = {w.url.rstrip("/") for w in registry.workers(healthy_only=False)}
        if entry.url.rstrip("/") in known:
            raise GatewayError(
                409,
                f"Worker {entry.url} is already registered",
                "invalid_request_error",
                param="url",
                code="worker_exists",
            )
        spec = WorkerSpec(
            url=entry.url, role=Role(entry.role), bootstrap_port=entry.bootstrap_port, model=entry.model
        )
        worker = await registry.add(spec)
        return _json({"worker": worker}, status=201)

    @delete("/admin/workers", guards=[admin_guard], status_code=200)
    async def remove_worker(url: FromQuery[str]) -> Response[bytes]:
        if not await registry.remove(url):
            raise GatewayError(
                404,
                f"No worker {url} is registered",
                "invalid_request_error",
                param="url",
                code="worker_not_found",
            )
        return _json({"removed": url})

    @get("/admin/decisions", guards=[admin_guard], sync_to_thread=False)
    def decisions(limit: FromQuery[int] = 50) -> Response[bytes]:
        if not 0 <= limit <= 10_000:
            raise bad_request("limit must be in 0..10000", param="limit")
        answer: dict[str, Any] = {"decisions": router.recent_decisions(limit)}
        pd = gateway.pd
        if pd is not None and pd.has_pools():
            # PD requests are routed by the forwarder's own prefill and decode routers.
            answer["pd"] = pd.recent_decisions(limit)
        return _json(answer)

    @get("/admin/config", guards=[admin_guard], sync_to_thread=False)
    def show_config() -> Response[bytes]:
        return _json(config.public())

    @get("/metrics", guards=[admin_guard], sync_to_thread=False)
    def metrics() -> Response[bytes]:
        # Guarded like /admin when a token is set: the labels name every server behind the gateway.
        return Response(content=gateway.render_metrics(), status_code=200, media_type=METRICS_CONTENT_TYPE)

    @get("/admin/state", guards=[admin_guard], sync_to_thread=False)
    def show_state() -> Response[bytes]:
        store = getattr(router, "store", None)
        status = store.status() if store is not None else {}
        answer: dict[str, Any] = {"store": dict(status)}
        routing_status = getattr(router, "status", None)
        if callable(routing_status):
            # The policy, capacity scales, learned speeds per target and the speed learning's counts.
            answer["routing"] = routing_status()
        pd = gateway.pd
        if pd is not None and pd.has_pools():
            answer["pd"] = pd.store_status()
        return _json(answer)

    return Litestar(
        route_handlers=[
            health,
            readiness,
            list_models,
            get_model,
            list_workers,
            add_worker,
            remove_worker,
            decisions,
            show_config,
            show_state,
            metrics,
        ],
        exception_handlers=_exception_handlers(),
        lifespan=[lifespan] if lifespan is not None else [],
        openapi_config=None,
        logging_config=None,
    )
