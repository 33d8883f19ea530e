"""docker-compose.yml and Dockerfile: valid against the compose spec, and true to the CLIs they call."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from backends.sim.cli import build_parser as sim_parser
from gateway.cli import build_parser as gateway_parser
from gateway.cli import config_from_args

REPO = Path(__file__).resolve().parents[3]
SCHEMA = REPO.parent / "shared" / "schemas" / "compose-spec.json"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return loaded


def test_compose_file_matches_the_compose_spec() -> None:
    if not SCHEMA.exists():
        pytest.skip(f"compose schema not found at {SCHEMA} (expected in ../shared/schemas beside the repo)")
    import json  # noqa: PLC0415

    # The spec declares draft-07 (its $schema URL lacks the "#" jsonschema looks up, so say it here).
    jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).validate(compose())


def test_compose_schema_check_can_fail() -> None:
    if not SCHEMA.exists():
        pytest.skip(f"compose schema not found at {SCHEMA}")
    import json  # noqa: PLC0415

    broken = compose()
    broken["services"]["gateway"]["ports"] = {"not": "a list"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).validate(broken)


def test_compose_commands_are_accepted_by_the_clis() -> None:
    services = compose()["services"]
    gateway_args = gateway_parser().parse_args(services["gateway"]["command"])
    config = config_from_args(gateway_args, env={})
    assert config.redis_url == "redis://redis:6379/0"
    sim = services["sim"]
    assert sim["entrypoint"][-1] == "backends.sim"
    sim_args = sim_parser().parse_args(sim["command"])
    ports = {int(p) for p in sim["expose"]}
    first = sim_args.base_port
    assert ports == set(range(first, first + sim_args.servers))
    assert {w.url for w in config.workers} == {f"http://sim:{p}" for p in ports}


def test_dockerfile_copies_what_the_package_needs() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+)", dockerfile, flags=re.MULTILINE))
    for needed in ("pyproject.toml", "gateway", "policies", "backends"):
        assert needed in copied
        assert (REPO / needed).exists()
    assert 'ENTRYPOINT ["gateway"]' in dockerfile
