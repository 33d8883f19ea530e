"""Headers a proxy must not pass along: they describe one hop's connection, not the message."""

from __future__ import annotations

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# The transport computes these itself from the URL and the body it sends.
_SET_BY_TRANSPORT = frozenset({"host", "content-length"})
_NOT_FORWARDED_UPSTREAM = HOP_BY_HOP | _SET_BY_TRANSPORT


def request_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The caller's headers minus the ones the transport owns."""
    return [(name, value) for name, value in headers if name.lower() not in _NOT_FORWARDED_UPSTREAM]


RawHeaders = list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...]


def response_headers(raw: RawHeaders) -> list[tuple[str, str]]:
    """Decode raw header pairs (latin-1, as HTTP/1.1 defines) and drop hop-by-hop ones."""
    out: list[tuple[str, str]] = []
    for raw_name, raw_value in raw:
        name = raw_name.decode("latin-1")
        if name.lower() not in HOP_BY_HOP:
            out.append((name, raw_value.decode("latin-1")))
    return out
