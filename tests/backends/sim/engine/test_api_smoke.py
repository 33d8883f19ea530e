"""The public API of backends.sim.engine as other components use it: build, add, step until done."""

from __future__ import annotations

from backends.sim.engine import (
    EngineConfig,
    RequestFinished,
    RequestScheduled,
    ServerEngine,
    SimRequest,
    Tokenizer,
    TokensGenerated,
    render_chat,
)


def test_one_chat_request_runs_to_length() -> None:
    tok = Tokenizer()
    engine = ServerEngine(EngineConfig(preset="h200-tp8"))
    rank = engine.ranks[engine.pick_rank()]
    ids = tok.encode(render_chat([{"role": "user", "content": "Tell me about routers."}]))
    rank.add(SimRequest("r1", ids, max_new_tokens=12, ignore_eos=True))
    events = []
    elapsed = 0.0
    while rank.has_work():
        result = rank.step()
        elapsed += result.duration_s
        events.extend(result.events)
    assert isinstance(events[0], RequestScheduled)
    tokens = [t for e in events if isinstance(e, TokensGenerated) for t in e.token_ids]
    assert len(tokens) == 12
    finished = events[-1]
    assert isinstance(finished, RequestFinished)
    assert finished.finish.to_sglang() == {"type": "length", "length": 12}
    assert finished.prompt_tokens == len(ids)
    assert finished.completion_tokens == 12
    assert 0.1 < elapsed < 1.0
    assert tok.decode(tokens).strip()
