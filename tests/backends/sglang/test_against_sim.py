"""Rank pinning checked end to end: a simulated SGLang server of each age reports the rank that served."""

from __future__ import annotations

import json

import msgspec
import pytest

from backends.sglang import shape_request
from backends.sim import ClusterSpec, SimCluster
from backends.sim.settings import ServerSettings
from gateway.upstream import UpstreamRequest, make_transport


class Server(msgspec.Struct, frozen=True):
    url: str
    version: str
    dp_size: int


# Old enough for data_parallel_rank, in the deprecation window, and newer than the release table.
@pytest.mark.parametrize("version", ["0.5.6", "0.5.12", "0.5.15"])
async def test_generate_lands_on_the_pinned_rank(version: str) -> None:
    settings = ServerSettings(dp_size=4, time_scale=0.01, sglang_version=version)
    transport = make_transport(max_connections=4, connect_timeout=1.0, read_timeout=10.0)
    async with SimCluster(ClusterSpec(servers=1, base=settings)) as cluster:
        server = Server(url=cluster.servers[0].url, version=version, dp_size=4)
        try:
            for rank in (3, 1, 0, 2):
                body, headers = shape_request(
                    server,
                    "generate",
                    b'{"text":"hello there","sampling_params":{"max_new_tokens":2}}',
                    [("content-type", "application/json")],
                    rank,
                )
                response = await transport.send(
                    UpstreamRequest("POST", server.url + "/generate", headers, body)
                )
                reply = json.loads(await response.aread())
                await response.aclose()
                assert response.status == 200, reply
                assert reply["meta_info"]["dp_rank"] == rank
        finally:
            await transport.aclose()
