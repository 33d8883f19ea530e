"""Configuration: file < environment < flags, validation with clear messages, the CLI's parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import build_parser, config_from_args
from gateway.config import ConfigError, GatewayConfig, WorkerEntry, load_config
from gateway.upstream import DEFAULT_TRANSPORT

FILE = """
port = 9000
policy = "round_robin"
max_body_bytes = 1024
retries = 1
models = ["deepseek-ai/DeepSeek-V3"]

[[workers]]
url = "http://10.0.0.1:30000"

[[workers]]
url = "http://10.0.0.2:30000"
role = "prefill"
bootstrap_port = 8998
"""


def write(tmp_path: Path, text: str = FILE) -> Path:
    path = tmp_path / "cachet.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    config = load_config(env={})
    assert config == GatewayConfig()
    assert config.max_body_bytes == 4 * 1024 * 1024
    assert config.policy == "prefix_aware" and config.redis_url is None and config.processes == 1


def test_file_is_read(tmp_path: Path) -> None:
    config = load_config(write(tmp_path), env={})
    assert config.port == 9000 and config.policy == "round_robin" and config.retries == 1
    assert [w.url for w in config.workers] == ["http://10.0.0.1:30000", "http://10.0.0.2:30000"]
    assert config.workers[1].role == "prefill" and config.workers[1].bootstrap_port == 8998


def test_environment_overrides_file_and_flags_override_environment(tmp_path: Path) -> None:
    env = {
        "CACHET_CONFIG": str(write(tmp_path)),
        "CACHET_PORT": "9100",
        "CACHET_RETRIES": "4",
        "CACHET_READ_TIMEOUT_S": "30.5",
        "CACHET_WORKER_URLS": "http://a:1, http://b:2",
        "CACHET_REDIS_URL": "redis://127.0.0.1:6380/0",
        "PATH": "/usr/bin",
    }
    config = load_config(env=env)
    assert config.port == 9100 and config.retries == 4 and config.read_timeout_s == 30.5
    assert [w.url for w in config.workers] == ["http://a:1", "http://b:2"]
    assert config.max_body_bytes == 1024  # from the file
    flagged = load_config(
        env=env, overrides={"port": 9200, "workers": [{"url": "http://c:3"}], "retries": None}
    )
    assert flagged.port == 9200 and [w.url for w in flagged.workers] == ["http://c:3"]
    assert flagged.retries == 4  # a flag not given does not override


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("port = 70000", {}, "port"),
        ("colour = 'blue'", {}, "colour"),
        ("port = [", {}, "TOML"),
        ("policy = 'psychic'", {}, "policy"),
        ("", {"CACHET_PORT": "eighty"}, "port"),
        ("", {"CACHET_BOGUS": "1"}, "CACHET_BOGUS"),
        ("", {"CACHET_WORKERS": "4"}, "CACHET_PROCESSES"),
        ("[[workers]]\nurl = 'localhost:30000'", {}, "http://"),
        ("[[workers]]\nurl = 'http://a'\n[[workers]]\nurl = 'http://a/'", {}, "twice"),
        ("[[workers]]\nurl = 'http://a'\nrole = 'boss'", {}, "role"),
        ("max_body_bytes = 0", {}, "max_body_bytes"),
        ("redis_url = 'localhost:6379'", {}, "redis_url"),
        ("transport = 'foo'", {}, "unknown transport 'foo'"),
        ("transport = 'httptools'\n[[workers]]\nurl = 'https://a'", {}, "http:// only"),
    ],
)
def test_invalid_settings_say_which(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), env=env)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})


def test_cli_flags(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--config",
            str(write(tmp_path)),
            "--port",
            "9300",
            "--worker",
            "http://x:1",
            "--prefill",
            "http://p:1,9001",
            "--decode",
            "http://d:1",
            "--policy",
            "least_load",
            "--redis-url",
            "redis://127.0.0.1:1/0",
            "--workers",
            "3",
            "--max-body-bytes",
            "2048",
        ]
    )
    config = config_from_args(args, env={})
    assert config.port == 9300 and config.processes == 3 and config.policy == "least_load"
    assert [(w.url, w.role, w.bootstrap_port) for w in config.workers] == [
        ("http://x:1", "regular", None),
        ("http://p:1", "prefill", 9001),
        ("http://d:1", "decode", None),
    ]
    assert config.max_body_bytes == 2048 and config.redis_url == "redis://127.0.0.1:1/0"


def test_cli_rejects_bootstrap_port_on_non_prefill() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--worker", "http://x:1,9000"])


def test_public_config_masks_secrets() -> None:
    config = GatewayConfig(admin_token="t", redis_url="redis://u:p@h:1/0")
    shown = config.public()
    assert shown["admin_token"] == "***" and shown["redis_url"] == "redis://***@h:1/0"


def test_pd_flags_reach_the_config() -> None:
    flags = ["serve", "--prefill", "http://p:1,9001", "--decode", "http://d:1"]
    defaults = config_from_args(build_parser().parse_args(flags), env={})
    assert (defaults.pd_direct_below_tokens, defaults.pd_fallback_to_regular) == (0, False)
    args = build_parser().parse_args(
        [*flags, "--pd-direct-below", "512", "--pd-fallback", "--pd-prefill-timeout", "30"]
    )
    config = config_from_args(args, env={})
    assert config.pd_direct_below_tokens == 512
    assert config.pd_fallback_to_regular is True
    assert config.pd_prefill_timeout_s == 30.0


def test_the_transport_resolves_to_one_that_speaks_every_workers_scheme() -> None:
    plain = GatewayConfig(workers=(WorkerEntry("http://a:1"),))
    assert plain.upstream_transport == DEFAULT_TRANSPORT == "httptools"
    tls = GatewayConfig(workers=(WorkerEntry("http://a:1"), WorkerEntry("https://b:1")))
    assert tls.upstream_transport == "aiohttp"
    chosen = GatewayConfig(transport="httpx", workers=(WorkerEntry("https://b:1"),))
    assert chosen.upstream_transport == "httpx"
    # /admin/config shows what is in use, not "null".
    assert plain.public()["transport"] == "httptools" and tls.public()["transport"] == "aiohttp"


def test_an_empty_transport_variable_means_the_default() -> None:
    assert load_config(env={"CACHET_TRANSPORT": ""}).transport is None
    assert load_config(env={"CACHET_TRANSPORT": "aiohttp"}).transport == "aiohttp"
