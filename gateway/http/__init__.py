"""The gateway's HTTP surface.

``GatewayASGI`` dispatches the generation endpoints (/v1/chat/completions, /v1/completions,
/generate) to ``Proxy`` (raw ASGI, bytes through) and everything else to the litestar app from
``build_litestar`` (health, readiness, models, admin).
"""

from gateway.http._dispatch import GatewayASGI
from gateway.http.proxy import PROXIED_PATHS, Proxy, ProxySettings, RouterLike
from gateway.http.routes import build_litestar

__all__ = ["PROXIED_PATHS", "GatewayASGI", "Proxy", "ProxySettings", "RouterLike", "build_litestar"]
