"""Several simulated servers (regular, prefill, decode) in one process and one event loop."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from types import TracebackType

import msgspec

from backends.sim.server import SimServer
from backends.sim.settings import Faults, ServerSettings

READY_PREFIX = "CACHET-SIM-READY"


class ServerInfo(msgspec.Struct):
    """What a client of the cluster needs to know about one server (the CACHET-SIM-READY line's entries)."""

    url: str
    role: str  # regular | prefill | decode
    bootstrap_port: int | None
    dp_size: int
    model: str


@dataclass(frozen=True)
class ClusterSpec:
    """`servers` regular + `prefill` + `decode` servers sharing `base` settings; `custom` adds any others.

    Ports: with base_port P > 0 the servers listen on P, P+1, ... and prefill bootstrap servers on the ports
    after those; with 0 every port is picked by the OS.
    """

    servers: int = 1
    prefill: int = 0
    decode: int = 0
    base: ServerSettings = dataclasses.field(default_factory=ServerSettings)
    base_port: int = 0
    custom: tuple[ServerSettings, ...] = ()
    faults: Faults | None = None
    prefill_dp_size: int | None = None  # None: base.dp_size
    decode_dp_size: int | None = None

    def server_settings(self) -> list[ServerSettings]:
        roles = ["null"] * self.servers + ["prefill"] * self.prefill + ["decode"] * self.decode
        total = len(roles) + len(self.custom)
        out: list[ServerSettings] = []
        boot_index = 0
        for i, role in enumerate(roles):
            port = self.base_port + i if self.base_port else 0
            boot = self.base.disaggregation_bootstrap_port
            dp_size = {"prefill": self.prefill_dp_size, "decode": self.decode_dp_size}.get(role)
            if role == "prefill":
                boot = self.base_port + total + boot_index if self.base_port else 0
                boot_index += 1
            out.append(
                dataclasses.replace(
                    self.base,
                    port=port,
                    disaggregation_mode=role,  # type: ignore[arg-type]
                    disaggregation_bootstrap_port=boot,
                    seed=self.base.seed + i,
                    dp_size=dp_size if dp_size is not None else self.base.dp_size,
                )
            )
        out.extend(self.custom)
        return out


class SimCluster:
    """`async with SimCluster(ClusterSpec(...)) as cluster:` — every server healthy inside the block."""

    def __init__(self, spec: ClusterSpec, *, ready_timeout_s: float = 120.0) -> None:
        self.spec = spec
        self._ready_timeout_s = ready_timeout_s
        self.sim_servers: list[SimServer] = [
            SimServer(settings, msgspec.structs.replace(spec.faults) if spec.faults is not None else None)
            for settings in spec.server_settings()
        ]

    @property
    def servers(self) -> list[ServerInfo]:
        return [
            ServerInfo(
                url=s.url,
                role=s.settings.role,
                bootstrap_port=s.bootstrap_port,
                dp_size=s.runtime.dp_size,
                model=s.settings.model_name,
            )
            for s in self.sim_servers
        ]

    def by_role(self, role: str) -> list[SimServer]:
        return [s for s in self.sim_servers if s.settings.role == role]

    def ready_line(self) -> str:
        payload = msgspec.json.encode({"servers": self.servers}).decode()
        return f"{READY_PREFIX} {payload}"

    async def start(self) -> None:
        try:
            for server in self.sim_servers:
                await server.start()
            await asyncio.gather(*(s.wait_ready(self._ready_timeout_s) for s in self.sim_servers))
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.sim_servers), return_exceptions=True)

    async def __aenter__(self) -> SimCluster:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
