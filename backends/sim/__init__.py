"""A simulated SGLang DeepSeek cluster a router cannot tell apart from real servers on the wire.

    async with SimCluster(ClusterSpec(servers=2, base=ServerSettings(dp_size=4, time_scale=0.01))) as cluster:
        cluster.servers          # [ServerInfo(url, role, bootstrap_port, dp_size, model), ...]
        cluster.sim_servers[0].faults / await cluster.sim_servers[0].set_faults(Faults(error_rate=0.5))

`python -m backends.sim serve|cluster` runs the same from the command line (see docs/simulator.md).
"""

from backends.sim.cluster import READY_PREFIX, ClusterSpec, ServerInfo, SimCluster
from backends.sim.server import SimServer
from backends.sim.settings import Faults, ServerSettings
from backends.sim.versions import RELEASE_DATES, VersionBehaviour, resolve_version

__all__ = [
    "READY_PREFIX",
    "RELEASE_DATES",
    "ClusterSpec",
    "Faults",
    "ServerInfo",
    "ServerSettings",
    "SimCluster",
    "SimServer",
    "VersionBehaviour",
    "resolve_version",
]
