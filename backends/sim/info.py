"""Health, info, load, cache and abort endpoints of an SGLang server."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import msgspec

from backends.sim.asgi import PROMETHEUS, TEXT_PLAIN, HttpRequest
from backends.sim.engine import RankLoad
from backends.sim.errors import (
    SchemaError,
    http_exception_body,
    openai_error_body,
    schema_error,
    validation_body,
)
from backends.sim.runtime import Runtime

_FLUSH_TEXT = (
    b"Cache flushed.\nPlease check backend logs for more details. "
    b"(When there are running or waiting requests, the operation will not be performed.)\n"
)
_LOAD_SECTIONS = frozenset({"core", "memory", "spec", "lora", "disagg", "queues", "all"})
# SGLang reports memory in GB (1e9 bytes).
_GB = 1e9


class InfoHandlers:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._server_args = self._build_server_args()

    # ---- health ----------------------------------------------------------------------------------------

    async def health(self, req: HttpRequest) -> None:
        runtime = self.runtime
        if not runtime.ready:
            await req.respond(503, b"", content_type=None)
            return
        if req.path == "/health" and not runtime.settings.health_runs_generate:
            await req.respond(200, b"", content_type=None)
            return
        ok = await runtime.probe(runtime.settings.health_check_timeout_s)
        await req.respond(200 if ok else 503, b"", content_type=None)

    async def embeddings(self, req: HttpRequest) -> None:
        message = (
            "This model does not appear to be an embedding model by default. "
            "Please add `--is-embedding` when launching the server or try another model."
        )
        await req.respond(400, openai_error_body(message, "BadRequestError", 400))

    # ---- model / server info ---------------------------------------------------------------------------

    async def model_info(self, req: HttpRequest) -> None:
        s = self.runtime.settings
        await req.respond_json(
            200,
            {
                "model_path": s.model_path,
                "tokenizer_path": s.model_path,
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": "default",
                "has_image_understanding": False,
                "has_audio_understanding": False,
                "model_type": "deepseek_v3",
                "architectures": ["DeepseekV3ForCausalLM"],
            },
        )

    def _build_server_args(self) -> dict[str, Any]:
        runtime = self.runtime
        s = runtime.settings
        eng = runtime.engine
        mode = s.disaggregation_mode
        return {
            "model_path": s.model_path,
            "tokenizer_path": s.model_path,
            "tokenizer_mode": "auto",
            "skip_tokenizer_init": False,
            "load_format": "auto",
            "trust_remote_code": True,
            "context_length": s.context_length,
            "is_embedding": False,
            "revision": None,
            "model_impl": "auto",
            "host": s.host,
            "port": s.port,
            "skip_server_warmup": False,
            "dtype": "auto",
            "quantization": "fp8",
            "kv_cache_dtype": "auto",
            "mem_fraction_static": round(1 - eng.preset.activation_reserve_fraction, 3),
            "max_running_requests": eng.max_running_requests * runtime.dp_size,
            "max_queued_requests": None,
            "max_total_tokens": s.max_total_num_tokens,
            "chunked_prefill_size": eng.chunked_prefill_size if eng.chunked_prefill_size is not None else -1,
            "max_prefill_tokens": eng.max_prefill_tokens,
            "schedule_policy": "fcfs",
            "schedule_conservativeness": 1.0,
            "page_size": s.page_size,
            "device": "cuda",
            "tp_size": runtime.tp_size,
            "pp_size": 1,
            "stream_interval": s.stream_interval,
            "incremental_streaming_output": s.incremental_streaming_output,
            "random_seed": s.seed,
            "served_model_name": s.model_name,
            "enable_cache_report": s.enable_cache_report,
            "enable_metrics": s.enable_metrics,
            "stream_response_default_include_usage": s.stream_response_default_include_usage,
            "dp_size": runtime.dp_size,
            "load_balance_method": runtime.load_balance_method,
            "enable_dp_attention": runtime.dp_size > 1,
            "speculative_algorithm": "EAGLE" if s.mtp else None,
            "speculative_num_steps": eng.perf.cal.mtp_draft_steps if s.mtp else None,
            "speculative_eagle_topk": 1 if s.mtp else None,
            "speculative_num_draft_tokens": eng.perf.cal.mtp_draft_steps + 1 if s.mtp else None,
            "disable_radix_cache": s.disable_radix_cache,
            "radix_eviction_policy": "lru",
            "disaggregation_mode": mode,
            "disaggregation_transfer_backend": "mooncake",
            "disaggregation_bootstrap_port": s.disaggregation_bootstrap_port,
            "disaggregation_decode_enable_radix_cache": False,
            "disaggregation_ib_device": None,
            "kv_events_config": None,
            "enable_trace": False,
        }

    def set_bootstrap_port(self, port: int) -> None:
        self._server_args["disaggregation_bootstrap_port"] = port

    def set_port(self, port: int) -> None:
        self._server_args["port"] = port

    async def server_info(self, req: HttpRequest) -> None:
        runtime = self.runtime
        eng = runtime.engine
        args = self._server_args
        states = []
        for driver in runtime.drivers:
            load = driver.engine.load()
            states.append(
                {
                    **args,
                    "dp_rank": driver.dp_rank,
                    "last_gen_throughput": load.gen_throughput,
                    "memory_usage": {
                        "weight": round(eng.weight_bytes_per_gpu / _GB, 2),
                        "kvcache": round(eng.kv_cache_bytes_per_gpu / _GB, 2),
                        "token_capacity": load.max_total_num_tokens,
                        "graph": 0.0,
                    },
                    "effective_max_running_requests_per_dp": eng.max_running_requests,
                }
            )
        info: dict[str, Any] = {
            **args,
            "status": "ready" if runtime.ready else "starting",
            "max_total_num_tokens": eng.max_total_num_tokens,
            "max_req_input_len": min(runtime.settings.context_length - 1, eng.max_total_num_tokens - 1) - 5,
            "internal_states": states,
            "version": runtime.version.version,
        }
        if runtime.version.kv_events_key:
            info["kv_events"] = None
        await req.respond_json(200, info)

    async def models(self, req: HttpRequest) -> None:
        await req.respond_json(200, {"object": "list", "data": [self._card()]})

    def _card(self) -> dict[str, Any]:
        s = self.runtime.settings
        return {
            "id": s.model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "sglang",
            "root": s.model_name,
            "parent": None,
            "max_model_len": s.context_length,
        }

    async def model(self, req: HttpRequest, name: str) -> None:
        if name == self.runtime.settings.model_name:
            await req.respond_json(200, self._card())
            return
        await req.respond_json(
            404,
            {
                "error": {
                    "message": f"The model '{name}' does not exist",
                    "type": "invalid_request_error",
                    "param": "model",
                    "code": "model_not_found",
                }
            },
        )

    # ---- loads -----------------------------------------------------------------------------------------

    def _rank_loads(self) -> list[RankLoad]:
        return [d.engine.load() for d in self.runtime.drivers]

    def _load_entry(
        self, dp_rank: int, load: RankLoad, include: set[str] | None, now: float
    ) -> dict[str, Any]:
        runtime = self.runtime
        eng = runtime.engine
        entry: dict[str, Any] = {
            "timestamp": now,
            "dp_rank": dp_rank,
            "num_running_reqs": load.num_running_reqs,
            "num_waiting_reqs": load.num_waiting_reqs,
            "num_waiting_uncached_tokens": load.num_waiting_uncached_tokens,
            "num_used_tokens": load.num_used_tokens,
            "num_total_tokens": load.num_used_tokens + load.num_waiting_uncached_tokens,
            "max_total_num_tokens": load.max_total_num_tokens,
            "max_running_requests": eng.max_running_requests,
            "token_usage": load.token_usage,
            "gen_throughput": load.gen_throughput,
            "cache_hit_rate": load.cache_hit_rate,
            "utilization": max(load.token_usage, load.num_running_reqs / max(eng.max_running_requests, 1)),
        }
        if include is not None and "all" not in include:
            bad = include - _LOAD_SECTIONS
            if bad:
                # SGLang raises this ValueError outside its try block: the client gets a bare 500.
                raise ValueError(f"Invalid include sections: {bad}")
            if include == {"core"}:
                return entry
        wants = (lambda name: True) if include is None or "all" in include else include.__contains__
        if wants("memory"):
            entry["memory"] = {
                "weight_gb": round(eng.weight_bytes_per_gpu / _GB, 2),
                "kv_cache_gb": round(eng.kv_cache_bytes_per_gpu / _GB, 2),
                "graph_gb": 0.0,
                "token_capacity": load.max_total_num_tokens,
            }
        if wants("spec") and runtime.settings.mtp:
            # The engine's MTP model: expected accepted length and per-draft-token acceptance probability.
            entry["speculative"] = {
                "accept_length": round(eng.perf.expected_accept_length(), 3),
                "accept_rate": eng.perf.cal.mtp_accept_prob,
            }
        if wants("disagg"):
            mode = runtime.settings.disaggregation_mode
            pending = runtime.rooms.pending() if mode == "prefill" else 0
            entry["disaggregation"] = {
                "mode": mode,
                "prefill_bootstrap_queue_reqs": pending if mode == "prefill" else 0,
                "prefill_inflight_queue_reqs": 0,
                "decode_prealloc_queue_reqs": 0,
                "decode_transfer_queue_reqs": 0,
                "decode_retracted_queue_reqs": 0,
                # The engine's transfer model (one NIC per GPU plus a fixed set-up latency); 0 without PD.
                "kv_transfer_speed_gb_s": round(eng.perf.gpu.nic_bandwidth / _GB, 3)
                if mode != "null"
                else 0.0,
                "kv_transfer_latency_ms": round(eng.perf.cal.pd_transfer_latency_s * 1e3, 3)
                if mode != "null"
                else 0.0,
            }
        if wants("queues"):
            entry["queues"] = {"waiting": load.num_waiting_reqs, "grammar": 0, "paused": 0, "retracted": 0}
        return entry

    async def v1_loads(self, req: HttpRequest) -> None:
        runtime = self.runtime
        include_raw = req.query.get("include")
        include = {s.strip() for s in include_raw.split(",")} if include_raw else None
        rank_raw = req.query.get("dp_rank")
        rank: int | None = None
        if rank_raw is not None:
            try:
                rank = int(rank_raw)
            except ValueError:
                err = schema_error(
                    ("dp_rank",),
                    "Input should be a valid integer, unable to parse string as an integer",
                    rank_raw,
                    "int_parsing",
                )
                err.errors[0]["loc"] = ("query", "dp_rank")
                await req.respond(400, validation_body(err))
                return
            if not 0 <= rank < runtime.dp_size:
                await req.respond(
                    400, http_exception_body(f"dp_rank={rank} out of range [0, {runtime.dp_size})", 400)
                )
                return
        loads = self._rank_loads()
        now = time.time()
        try:
            entries = [
                self._load_entry(i, load, include, now)
                for i, load in enumerate(loads)
                if rank is None or i == rank
            ]
        except ValueError:
            await req.respond(500, b"Internal Server Error", content_type=TEXT_PLAIN)
            return
        if req.query.get("format") == "prometheus":
            await req.respond(200, _loads_prometheus(entries), content_type=PROMETHEUS)
            return
        body: dict[str, Any] = {
            "timestamp": dt.datetime.now(dt.UTC).isoformat(),
            "version": runtime.version.version,
            "loads": entries,
        }
        if runtime.version.v1_loads_aggregate:
            n = max(len(loads), 1)
            body["dp_rank_count"] = len(loads)
            body["aggregate"] = {
                "total_running_reqs": sum(x.num_running_reqs for x in loads),
                "total_waiting_reqs": sum(x.num_waiting_reqs for x in loads),
                "total_reqs": sum(x.num_running_reqs + x.num_waiting_reqs for x in loads),
                "total_used_tokens": sum(x.num_used_tokens for x in loads),
                "total_tokens": sum(x.num_used_tokens + x.num_waiting_uncached_tokens for x in loads),
                "avg_token_usage": sum(x.token_usage for x in loads) / n,
                "avg_throughput": sum(x.gen_throughput for x in loads) / n,
                "avg_utilization": sum(e["utilization"] for e in entries) / max(len(entries), 1),
            }
        await req.respond_json(200, body)

    async def get_load(self, req: HttpRequest) -> None:
        loads = self._rank_loads()
        shape = self.runtime.version.get_load_shape
        if shape == "scalar":
            await req.respond_json(200, {"load": sum(x.num_used_tokens for x in loads)})
            return
        out: list[dict[str, Any]] = []
        for i, x in enumerate(loads):
            entry: dict[str, Any] = {
                "dp_rank": i,
                "num_reqs": x.num_running_reqs + x.num_waiting_reqs,
                "num_waiting_reqs": x.num_waiting_reqs,
                "num_tokens": x.num_used_tokens,
            }
            if shape == "list_pending":
                entry["num_pending_tokens"] = x.num_waiting_uncached_tokens
                entry["ts_tic"] = time.perf_counter()
            out.append(entry)
        await req.respond_json(200, out)

    # ---- control ---------------------------------------------------------------------------------------

    async def flush_cache(self, req: HttpRequest) -> None:
        ok = self.runtime.flush_cache()
        await req.respond(200 if ok else 400, _FLUSH_TEXT, content_type=None)

    async def abort_request(self, req: HttpRequest) -> None:
        try:
            obj = msgspec.json.decode(await req.body())
            if not isinstance(obj, dict):
                raise schema_error((), "Input should be a valid dictionary", obj, "dict_type")
            rid = obj.get("rid", "")
            abort_all = obj.get("abort_all", False)
            if not isinstance(rid, str) or not isinstance(abort_all, bool):
                raise schema_error(("rid",), "Input should be a valid string", rid, "string_type")
        except msgspec.DecodeError:
            await req.respond(
                400, validation_body(schema_error((0,), "JSON decode error", {}, "json_invalid"))
            )
            return
        except SchemaError as exc:
            await req.respond(400, validation_body(exc))
            return
        if abort_all:
            self.runtime.abort_all()
        elif rid:
            self.runtime.abort(rid)
        await req.respond(200, b"", content_type=None)

    async def metrics(self, req: HttpRequest) -> None:
        runtime = self.runtime
        loads = self._rank_loads()
        pd_waiting = [runtime.rooms.pending() if i == 0 else 0 for i in range(len(loads))]
        await req.respond(200, runtime.metrics.render(loads, pd_waiting), content_type=PROMETHEUS)


def _loads_prometheus(entries: list[dict[str, Any]]) -> bytes:
    prefixes = {"speculative": "spec", "disaggregation": "disagg"}
    samples: dict[str, list[tuple[int, float]]] = {}
    for entry in entries:
        rank = int(entry["dp_rank"])
        for key, value in entry.items():
            if key == "dp_rank":
                continue
            if isinstance(value, dict):
                prefix = prefixes.get(key, key)
                for sub, sub_value in value.items():
                    if isinstance(sub_value, int | float) and not isinstance(sub_value, bool):
                        samples.setdefault(f"sglang_{prefix}_{sub}", []).append((rank, sub_value))
            elif isinstance(value, int | float) and not isinstance(value, bool):
                samples.setdefault(f"sglang_{key}", []).append((rank, value))
    lines: list[str] = []
    for name, values in samples.items():
        lines.append(f"# TYPE {name} gauge")
        lines.extend(f'{name}{{dp_rank="{rank}"}} {value}' for rank, value in values)
    return ("\n".join(lines) + "\n").encode()
