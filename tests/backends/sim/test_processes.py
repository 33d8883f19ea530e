"""Real processes: PD across two `serve` processes, the `cluster` command, clean SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from backends.sim import READY_PREFIX

from .conftest import FAST, sse_events


class Proc:
    def __init__(self, process: asyncio.subprocess.Process, ready: dict[str, Any]) -> None:
        self.process = process
        self.ready = ready

    @property
    def server(self) -> dict[str, Any]:
        server: dict[str, Any] = self.ready["servers"][0]
        return server


@contextlib.asynccontextmanager
async def sim_process(*args: str, ready_within_s: float = 60.0) -> AsyncIterator[Proc]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "backends.sim",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), ready_within_s)
        assert line.startswith(READY_PREFIX.encode()), line
        yield Proc(process, json.loads(line[len(READY_PREFIX) :]))
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


PD_ARGS = (
    "--port",
    "0",
    "--time-scale",
    str(FAST),
    "--dp-size",
    "2",
    "--disaggregation-bootstrap-timeout",
    "1",
    "--disaggregation-waiting-timeout",
    "1",
)


async def test_pd_across_two_processes() -> None:
    async with (
        sim_process(
            "serve", "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", "0", *PD_ARGS
        ) as prefill,
        sim_process("serve", "--disaggregation-mode", "decode", *PD_ARGS) as decode,
    ):
        p, d = prefill.server, decode.server
        assert p["role"] == "prefill" and isinstance(p["bootstrap_port"], int)
        assert d["role"] == "decode" and d["bootstrap_port"] is None
        boot = {"bootstrap_host": "127.0.0.1", "bootstrap_port": p["bootstrap_port"]}
        prompt = "A long shared system prompt for PD. " * 30
        async with httpx.AsyncClient(timeout=20) as c:
            health = await c.get(f"http://127.0.0.1:{p['bootstrap_port']}/health")
            assert health.text == "OK"
            route = (
                await c.get(
                    f"http://127.0.0.1:{p['bootstrap_port']}/route",
                    params={"prefill_dp_rank": -1, "target_tp_rank": -1, "target_pp_rank": -1},
                )
            ).json()
            assert route["dp_size"] == 2 and route["follow_bootstrap_room"] is True
            cached = []
            for i in range(2):
                room = (
                    random.getrandbits(62) * 2
                )  # same parity: the prefill follows the room to the same rank
                body = {
                    "text": prompt + f"question {i}",
                    "sampling_params": {"max_new_tokens": 5},
                    **boot,
                    "bootstrap_room": room,
                }
                rp, rd = await asyncio.gather(
                    c.post(p["url"] + "/generate", json=body), c.post(d["url"] + "/generate", json=body)
                )
                assert rp.status_code == 200 and rd.status_code == 200, (rp.text, rd.text)
                pm, dm = rp.json()["meta_info"], rd.json()["meta_info"]
                assert pm["finish_reason"] == {"type": "length", "length": 0} and pm["completion_tokens"] == 1
                assert dm["completion_tokens"] == 5 and dm["finish_reason"] == {"type": "length", "length": 5}
                assert rd.json()["output_ids"][0] == rp.json()["output_ids"][0]
                assert dm["cached_tokens"] == pm["cached_tokens"]
                cached.append(dm["cached_tokens"])
            assert cached[1] > cached[0]
            # Streaming decode, OpenAI flavour.
            room = random.getrandbits(62)
            chat = {
                "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 3,
                "stream": True,
                **boot,
                "bootstrap_room": room,
            }
            rp, rd = await asyncio.gather(
                c.post(p["url"] + "/v1/chat/completions", json={**chat, "stream": False}),
                c.post(d["url"] + "/v1/chat/completions", json=chat),
            )
            assert rp.json()["choices"][0]["finish_reason"] == "length"
            chunks = [json.loads(e) for e in sse_events(rd.content)[:-1]]
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            # Errors: missing room, a room the prefill never sees, a prefill whose decode never comes.
            missing = await c.post(d["url"] + "/generate", json={"text": "x"})
            assert missing.status_code == 400
            assert missing.json()["error"]["message"].startswith(
                "Invalid request: Disaggregated request received without bootstrap room id."
            )
            lost = await c.post(d["url"] + "/generate", json={"text": "x", **boot, "bootstrap_room": 1})
            assert lost.status_code == 500
            assert "timed out after 1.0s in KVPoll.WaitingForInput" in lost.json()["message"]
            alone = await c.post(p["url"] + "/generate", json={"text": "x", **boot, "bootstrap_room": 2})
            assert alone.status_code == 500
            assert "timed out after 1.0s in KVPoll.Bootstrapping" in alone.json()["message"]
            assert (await c.get(p["url"] + "/health")).status_code == 200
            assert (await c.get(d["url"] + "/health")).status_code == 200
            info = (await c.get(p["url"] + "/server_info")).json()
            assert info["disaggregation_mode"] == "prefill"
            assert info["disaggregation_bootstrap_port"] == p["bootstrap_port"]


async def test_cluster_command_prints_ready_line_and_stops_on_sigterm() -> None:
    async with sim_process(
        "cluster",
        "--servers",
        "2",
        "--prefill",
        "1",
        "--decode",
        "1",
        "--dp-size",
        "2",
        "--decode-dp-size",
        "4",
        "--time-scale",
        str(FAST),
    ) as proc:
        servers = proc.ready["servers"]
        assert [s["role"] for s in servers] == ["regular", "regular", "prefill", "decode"]
        assert all(set(s) == {"url", "role", "bootstrap_port", "dp_size", "model"} for s in servers)
        assert [s["dp_size"] for s in servers] == [2, 2, 2, 4]
        assert all(s["model"] == "deepseek-ai/DeepSeek-V3" for s in servers)
        async with httpx.AsyncClient() as c:
            for s in servers:
                assert (await c.get(s["url"] + "/health")).status_code == 200
        proc.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.process.wait(), 15) == 0


async def test_bad_arguments_exit_with_message() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "backends.sim",
        "serve",
        "--port",
        "0",
        "--sglang-version",
        "1.2.3",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert b"unknown SGLang version" in err


@pytest.mark.parametrize("preset", ["h20-tp16"])
async def test_sixteen_ranks_in_one_process(preset: str) -> None:
    async with sim_process(
        "serve", "--port", "0", "--preset", preset, "--dp-size", "16", "--time-scale", str(FAST)
    ) as proc:
        async with httpx.AsyncClient(base_url=proc.server["url"]) as c:
            loads = (await c.get("/v1/loads", params={"include": "core"})).json()["loads"]
        assert len(loads) == 16


async def test_port_in_use_is_a_clean_error() -> None:
    async with sim_process("serve", "--port", "0", "--time-scale", str(FAST)) as first:
        port = first.server["url"].rsplit(":", 1)[1]
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "backends.sim",
            "serve",
            "--port",
            port,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 1
        assert b"error:" in err and b"Traceback" not in err
