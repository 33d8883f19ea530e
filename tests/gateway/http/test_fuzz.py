"""No client input produces a 500 or a hang: seeded random bodies against every proxied endpoint."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from tests.gateway.http._fakes import MODEL, FakeResponse, Harness, worker

A = "http://10.0.0.1:30000"
FIELDS = [
    "model",
    "messages",
    "prompt",
    "text",
    "input_ids",
    "stream",
    "max_tokens",
    "max_completion_tokens",
    "sampling_params",
    "n",
    "routed_dp_rank",
    "stream_options",
]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["int", "bigint", "float", "str", "bool", "null", "list", "dict"]
    if depth > 3:
        kinds = kinds[:6]
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randint(-5, 5)
    if kind == "bigint":
        return rng.choice([2**63, -(2**63) - 1, 10**30])
    if kind == "float":
        return rng.choice([0.5, -1.5, 1e308])
    if kind == "str":
        return rng.choice(["", "x", MODEL, "\u0000", "é" * 3, "[DONE]"])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {
        rng.choice([*FIELDS, "role", "content"]): random_value(rng, depth + 1)
        for _ in range(rng.randint(0, 3))
    }


def random_body(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.1:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
    if roll < 0.2:
        return json.dumps(random_value(rng)).encode()
    body = {rng.choice(FIELDS): random_value(rng) for _ in range(rng.randint(0, 6))}
    if rng.random() < 0.5:
        body["model"] = MODEL
    text = json.dumps(body)
    if rng.random() < 0.1:
        text = text[: rng.randint(0, len(text))]
    return text.encode()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/generate"])
async def test_random_bodies_never_500(path: str) -> None:
    rng = random.Random(path)
    harness = Harness([worker(A, dp_size=2)], lambda _request: FakeResponse(200, [b"{}"]))
    async with harness.client() as client:
        for _ in range(150):
            body = random_body(rng)
            reply = await client.post(path, content=body)
            assert reply.status_code in (200, 400, 404), (body, reply.status_code, reply.text)
            if reply.status_code != 200:
                assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
