"""Health, readiness, model list and the admin API."""

from __future__ import annotations

import msgspec

from gateway.pd import PDForwarder
from gateway.registry import Worker
from policies.types import Role
from tests.gateway.http._fakes import MODEL, FakeResponse, Harness, worker

A = "http://10.0.0.1:30000"
B = "http://10.0.0.2:30000"
R1 = "deepseek-ai/DeepSeek-R1"


def ok(_request: object) -> FakeResponse:
    return FakeResponse(200, [b"{}"])


async def test_health_is_always_200() -> None:
    async with Harness([], ok).client() as client:
        reply = await client.get("/health")
    assert reply.status_code == 200 and reply.json() == {"status": "ok"}


async def test_readiness_needs_a_healthy_worker_per_model() -> None:
    harness = Harness([worker(A), worker(B, model=R1, healthy=False)], ok)
    async with harness.client() as client:
        not_ready = await client.get("/readiness")
        assert not_ready.status_code == 503
        assert R1 in not_ready.json()["error"]["message"]
        assert not_ready.headers["retry-after"]
        harness.registry.items[B] = worker(B, model=R1)
        ready = await client.get("/readiness")
    assert ready.status_code == 200
    assert ready.json()["healthy_workers"] == {MODEL: 1, R1: 1}


async def test_an_unreachable_server_does_not_hold_readiness_back() -> None:
    unreachable = Worker(url=B)  # never discovered: no model, not healthy
    harness = Harness([worker(A), unreachable], ok)
    async with harness.client() as client:
        assert (await client.get("/readiness")).status_code == 200
        models = (await client.get("/v1/models")).json()["data"]
    assert [m["id"] for m in models] == [MODEL]


async def test_readiness_waits_for_configured_models() -> None:
    harness = Harness([worker(A)], ok, models=(MODEL, R1))
    async with harness.client() as client:
        assert (await client.get("/readiness")).status_code == 503
    assert (await Harness([], ok).client().get("/readiness")).status_code == 503


async def test_models_lists_served_models_in_openai_shape() -> None:
    harness = Harness([worker(A), worker(B, model=R1, healthy=False)], ok)
    async with harness.client() as client:
        listing = (await client.get("/v1/models")).json()
        card = await client.get(f"/v1/models/{MODEL}")
    assert listing["object"] == "list"
    assert sorted(m["id"] for m in listing["data"]) == sorted([MODEL, R1])
    assert all(m["object"] == "model" and m["max_model_len"] == 163840 for m in listing["data"])
    assert card.status_code == 200 and card.json()["id"] == MODEL


async def test_admin_lists_adds_and_removes_workers_at_run_time() -> None:
    harness = Harness([worker(A)], ok)
    async with harness.client() as client:
        listed = (await client.get("/admin/workers")).json()["workers"]
        assert [w["url"] for w in listed] == [A]
        assert listed[0]["dp_size"] == 1 and listed[0]["healthy"] is True
        added = await client.post("/admin/workers", json={"url": B, "model": R1})
        assert added.status_code == 201 and added.json()["worker"]["url"] == B
        duplicate = await client.post("/admin/workers", json={"url": B})
        assert duplicate.status_code == 409 and duplicate.json()["error"]["code"] == "worker_exists"
        bad = await client.post("/admin/workers", json={"url": "ftp://x"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "url"
        bad_role = await client.post("/admin/workers", json={"url": "http://x", "role": "boss"})
        assert bad_role.status_code == 400
        garbage = await client.post("/admin/workers", content=b"{oops")
        assert garbage.status_code == 400 and garbage.json()["error"]["code"] == "invalid_json"
        routed = await client.post("/v1/completions", json={"model": R1, "prompt": "x"})
        assert routed.headers["x-cachet-worker"] == B
        removed = await client.delete("/admin/workers", params={"url": B})
        assert removed.status_code == 200
        again = await client.delete("/admin/workers", params={"url": B})
        assert again.status_code == 404 and again.json()["error"]["code"] == "worker_not_found"
        missing = await client.delete("/admin/workers")
        assert missing.status_code == 400 and set(missing.json()["error"]) == {
            "message",
            "type",
            "param",
            "code",
        }
        gone = await client.post("/v1/completions", json={"model": R1, "prompt": "x"})
        assert gone.status_code == 404


async def test_admin_refuses_an_https_worker_the_transport_cannot_reach() -> None:
    async with Harness([worker(A)], ok).client() as client:  # default transport: httptools
        refused = await client.post("/admin/workers", json={"url": "https://sglang.example:30000"})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "url"
    assert "--transport aiohttp" in refused.json()["error"]["message"]
    async with Harness([worker(A)], ok, transport="aiohttp").client() as client:
        added = await client.post("/admin/workers", json={"url": "https://sglang.example:30000"})
    assert added.status_code == 201


async def test_admin_recent_decisions() -> None:
    harness = Harness([worker(A), worker(B)], ok)
    async with harness.client() as client:
        for _ in range(3):
            await client.post("/v1/completions", json={"model": MODEL, "prompt": "hello"})
        decisions = (await client.get("/admin/decisions", params={"limit": 2})).json()["decisions"]
        bad = await client.get("/admin/decisions", params={"limit": "lots"})
        negative = await client.get("/admin/decisions", params={"limit": -1})
    assert len(decisions) == 2
    assert {d["worker"] for d in decisions} <= {A, B}
    assert all(d["policy"] == "round_robin" for d in decisions)
    assert bad.status_code == 400 and "error" in bad.json()
    assert negative.status_code == 400


async def test_admin_token_guards_admin_only() -> None:
    harness = Harness([worker(A)], ok, admin_token="s3cret", redis_url="redis://user:pw@127.0.0.1:1/0")
    async with harness.client() as client:
        denied = await client.get("/admin/workers")
        allowed = await client.get("/admin/config", headers={"authorization": "Bearer s3cret"})
        public = await client.get("/v1/models")
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "unauthorized"
    assert allowed.status_code == 200
    shown = allowed.json()
    assert shown["admin_token"] == "***" and "pw" not in shown["redis_url"]
    assert public.status_code == 200


async def test_admin_state_shows_store_and_routing_status() -> None:
    async with Harness([worker(A)], ok).client() as client:
        reply = await client.get("/admin/state")
    assert reply.status_code == 200 and "store" in reply.json()
    routing = reply.json()["routing"]
    assert routing["policy"] == "round_robin" and "speeds" in routing


class _PDRouter:
    """A PD leg's router as the admin API sees it: recent decisions and a state store."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.store = self

    def recent_decisions(self, limit: int) -> list[dict[str, object]]:
        return [{"worker": f"{self.role}-{i}", "policy": "pd"} for i in range(limit)]

    def status(self) -> dict[str, object]:
        return {"store": "memory", "leases": 1 if self.role == "prefill" else 2}


def _with_pd(harness: Harness) -> None:
    harness.registry.items[B] = msgspec.structs.replace(worker(B), role=Role.PREFILL)
    harness.gateway.pd = PDForwarder(
        harness.registry,  # type: ignore[arg-type]
        harness.transport,
        prefill_router=_PDRouter("prefill"),  # type: ignore[arg-type]
        decode_router=_PDRouter("decode"),  # type: ignore[arg-type]
    )


async def test_admin_decisions_and_state_include_pd_routing() -> None:
    harness = Harness([worker(A)], ok)
    _with_pd(harness)
    async with harness.client() as client:
        decisions = (await client.get("/admin/decisions", params={"limit": 2})).json()
        state = (await client.get("/admin/state")).json()
    assert decisions["decisions"] == []
    assert [d["worker"] for d in decisions["pd"]["prefill"]] == ["prefill-0", "prefill-1"]
    assert [d["worker"] for d in decisions["pd"]["decode"]] == ["decode-0", "decode-1"]
    assert "store" in state
    assert state["pd"] == {
        "prefill": {"store": "memory", "leases": 1},
        "decode": {"store": "memory", "leases": 2},
    }


async def test_admin_decisions_has_no_pd_section_without_pd_pools() -> None:
    async with Harness([worker(A)], ok).client() as client:
        decisions = (await client.get("/admin/decisions")).json()
        state = (await client.get("/admin/state")).json()
    assert "pd" not in decisions and "pd" not in state


async def test_admin_errors_are_openai_shaped_with_string_codes_and_the_param() -> None:
    harness = Harness([worker(A)], ok)
    async with harness.client() as client:
        bad_limit = await client.get("/admin/decisions", params={"limit": "x"})
        no_url = await client.delete("/admin/workers")
        url_type = await client.post("/admin/workers", json={"url": 5})
        bad_role = await client.post("/admin/workers", json={"url": "http://10.0.0.9:1", "role": "boss"})
        not_json = await client.post("/admin/workers", content=b"{bad")
        not_utf8 = await client.post("/admin/workers", content=b'{"url": "http://\xff"}')
    for reply, param, code in [
        (bad_limit, "limit", "invalid_request"),
        (no_url, "url", "invalid_request"),
        (url_type, "url", "invalid_request"),
        (bad_role, "role", "invalid_request"),
        (not_json, None, "invalid_json"),
        (not_utf8, None, "invalid_json"),
    ]:
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert "not valid JSON" not in url_type.json()["error"]["message"]
