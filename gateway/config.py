"""Gateway configuration: one typed struct, filled from a TOML file, CACHET_* variables and CLI flags.

Precedence, highest first: command-line flags > environment variables > the config file > defaults.
A list given at a higher level replaces the lower one (``--worker`` flags replace the file's
``[[workers]]``; they are not appended). The file is TOML (``tomllib`` is in the standard library,
so reading it needs no extra dependency); its keys are exactly the field names of ``GatewayConfig``.

Environment variables are ``CACHET_`` + the upper-cased field name (``CACHET_PORT=9000``,
``CACHET_REDIS_URL=redis://...``); lists are comma-separated (``CACHET_MODELS=a,b``), and upstream
servers are ``CACHET_WORKER_URLS=http://h1:30000,http://h2:30000`` (regular role).
``CACHET_CONFIG`` names the config file when ``--config`` is not given.
"""

from __future__ import annotations

import importlib.util
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from gateway.upstream import DEFAULT_TRANSPORT, TRANSPORT_NAMES
from policies.registry import DEFAULT_POLICY, policy_names

__all__ = ["ENV_PREFIX", "ConfigError", "GatewayConfig", "WorkerEntry", "load_config"]

ENV_PREFIX = "CACHET_"
_MIB = 1024 * 1024
# The transport that has no TLS, and the one chosen instead when a worker needs it.
_HTTP_ONLY_TRANSPORT = "httptools"
_TLS_TRANSPORT = "aiohttp"
# Transports whose client package is an optional dependency.
_OPTIONAL_TRANSPORTS = frozenset({"httpx", "httpx2"})


class ConfigError(ValueError):
    """The configuration is invalid; the message says which setting and why."""


class WorkerEntry(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One upstream SGLang server the gateway starts with (more can be added through /admin)."""

    url: str
    role: Literal["regular", "prefill", "decode"] = "regular"
    # PD: the prefill server's --disaggregation-bootstrap-port (SGLang's default is 8998).
    bootstrap_port: int | None = None
    # The served model name, when known up front; otherwise discovered from /server_info.
    model: str | None = None


class GatewayConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Every setting of a gateway process, resolved at start-up."""

    host: str = "127.0.0.1"
    port: int = 8000
    # OS processes serving the same port (SO_REUSEPORT via uvicorn workers). Without redis_url each
    # process keeps its own routing state.
    processes: int = 1
    workers: tuple[WorkerEntry, ...] = ()
    # Models /readiness waits for; empty: every model the configured workers serve.
    models: tuple[str, ...] = ()
    policy: str = DEFAULT_POLICY
    # Shared routing state for gateway replicas; None: embedded in-memory state.
    redis_url: str | None = None
    seed: int | None = None
    # Upstream transport implementation (see gateway.upstream.make_transport); None: the fastest
    # one that speaks every configured worker's scheme (see ``upstream_transport``).
    transport: str | None = None
    connect_timeout_s: float = 2.0
    # Longest silence tolerated from an upstream (no headers / no next byte) before giving up.
    read_timeout_s: float = 600.0
    # SGLang's uvicorn closes idle connections after 5 s; reuse them only well inside that.
    keepalive_expiry_s: float = 4.0
    max_connections: int = 1024
    max_body_bytes: int = 4 * _MIB
    # Extra attempts on another worker when one fails before sending any byte.
    retries: int = 2
    retry_after_s: int = 2
    health_interval_s: float = 5.0
    health_fail_threshold: int = 3
    health_recover_threshold: int = 2
    load_interval_s: float = 1.0
    # PD pools (gateway.pd): skip the prefill hop when fewer uncached prompt tokens than this would
    # be prefilled (a regular worker of the model serves it; 0 = always disaggregate), serve on
    # regular workers when a pool is down, and the longest wait for the prefill's answer.
    pd_direct_below_tokens: int = 0
    pd_fallback_to_regular: bool = False
    pd_prefill_timeout_s: float = 120.0
    otlp_endpoint: str | None = None
    # When set, /admin requires "Authorization: Bearer <admin_token>".
    admin_token: str | None = None
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if self.processes < 1:
            raise ConfigError(f"processes must be >= 1, got {self.processes}")
        positive = {
            "connect_timeout_s": self.connect_timeout_s,
            "read_timeout_s": self.read_timeout_s,
            "keepalive_expiry_s": self.keepalive_expiry_s,
            "health_interval_s": self.health_interval_s,
            "load_interval_s": self.load_interval_s,
            "pd_prefill_timeout_s": self.pd_prefill_timeout_s,
            "max_body_bytes": self.max_body_bytes,
            "max_connections": self.max_connections,
            "health_fail_threshold": self.health_fail_threshold,
            "health_recover_threshold": self.health_recover_threshold,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name} must be > 0, got {value}")
        if self.pd_direct_below_tokens < 0:
            raise ConfigError(f"pd_direct_below_tokens must be >= 0, got {self.pd_direct_below_tokens}")
        if self.retries < 0:
            raise ConfigError(f"retries must be >= 0, got {self.retries}")
        if self.retry_after_s < 0:
            raise ConfigError(f"retry_after_s must be >= 0, got {self.retry_after_s}")
        if self.policy not in policy_names():
            raise ConfigError(f"unknown policy {self.policy!r}; choose one of {', '.join(policy_names())}")
        for worker in self.workers:
            if not worker.url.startswith(("http://", "https://")):
                raise ConfigError(f"worker url must start with http:// or https://, got {worker.url!r}")
        if self.transport is not None and self.transport not in TRANSPORT_NAMES:
            raise ConfigError(
                f"unknown transport {self.transport!r}; choose one of {', '.join(TRANSPORT_NAMES)}"
            )
        if self.transport in _OPTIONAL_TRANSPORTS and importlib.util.find_spec(self.transport) is None:
            package = self.transport
            raise ConfigError(f"transport {package!r} needs the {package!r} package: pip install {package}")
        https = [worker.url for worker in self.workers if worker.url.startswith("https://")]
        if https and self.transport == _HTTP_ONLY_TRANSPORT:
            raise ConfigError(
                f"transport {_HTTP_ONLY_TRANSPORT!r} speaks http:// only, but {https[0]} is https://; "
                "use --transport aiohttp (or leave it unset)"
            )
        urls = [worker.url.rstrip("/") for worker in self.workers]
        if len(set(urls)) != len(urls):
            raise ConfigError("a worker url is listed twice")
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                f"redis_url must be a redis://, rediss:// or unix:// URL, got {self.redis_url!r}"
            )

    @property
    def upstream_transport(self) -> str:
        """The transport the gateway uses: the chosen one, else the fastest (http:// only) unless
        some worker is https://, then aiohttp."""
        if self.transport is not None:
            return self.transport
        if DEFAULT_TRANSPORT == _HTTP_ONLY_TRANSPORT and self.has_https_workers:
            return _TLS_TRANSPORT
        return DEFAULT_TRANSPORT

    @property
    def upstream_speaks_https(self) -> bool:
        """Whether the transport in use can reach an https:// worker (httptools speaks http:// only)."""
        return self.upstream_transport != _HTTP_ONLY_TRANSPORT

    @property
    def has_https_workers(self) -> bool:
        return any(worker.url.startswith("https://") for worker in self.workers)

    def public(self) -> dict[str, Any]:
        """The settings as shown by /admin/config: secrets masked, the transport as resolved."""
        shown: dict[str, Any] = msgspec.to_builtins(self)
        shown["transport"] = self.upstream_transport
        if self.admin_token:
            shown["admin_token"] = "***"
        if self.redis_url and "@" in self.redis_url:
            scheme, _, rest = self.redis_url.partition("://")
            shown["redis_url"] = f"{scheme}://***@{rest.rpartition('@')[2]}"
        return shown


_FIELDS: frozenset[str] = frozenset(GatewayConfig.__struct_fields__)
_LIST_FIELDS = frozenset({"models"})
# Variables the process reads that are not settings (and must not be rejected as unknown).
_NOT_SETTINGS = frozenset({"CONFIG", "WORKER_URLS", "RESOLVED_CONFIG", "METRICS_DIR"})
# Optional settings an empty variable (CACHET_TRANSPORT=) leaves at their default.
_EMPTY_MEANS_UNSET = frozenset({"redis_url", "otlp_endpoint", "transport"})


def _from_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return data


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX) :]
        if name in _NOT_SETTINGS:
            continue
        field = name.lower()
        if field == "workers":
            raise ConfigError(
                f"{key} is ambiguous: use {ENV_PREFIX}PROCESSES for the number of gateway processes "
                f"or {ENV_PREFIX}WORKER_URLS for the upstream servers"
            )
        if field not in _FIELDS:
            raise ConfigError(f"unknown environment variable {key}")
        if field in _LIST_FIELDS:
            out[field] = [item.strip() for item in value.split(",") if item.strip()]
        else:
            out[field] = value if value != "" or field not in _EMPTY_MEANS_UNSET else None
    urls = env.get(ENV_PREFIX + "WORKER_URLS")
    if urls is not None:
        out["workers"] = [{"url": url.strip()} for url in urls.split(",") if url.strip()]
    return out


def load_config(
    config_file: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> GatewayConfig:
    """Merge file < environment < ``overrides`` (CLI flags; None values are ignored) into a config."""
    environ = env if env is not None else {}
    merged: dict[str, Any] = {}
    file_name = config_file if config_file is not None else environ.get(ENV_PREFIX + "CONFIG")
    if file_name:
        merged.update(_from_file(Path(file_name)))
    merged.update(_from_env(environ))
    for key, value in (overrides or {}).items():
        if key not in _FIELDS:
            raise ConfigError(f"unknown setting {key!r}")
        if value is not None:
            merged[key] = value
    try:
        # Not strict: environment values arrive as strings ("9000", "true").
        return msgspec.convert(merged, GatewayConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
