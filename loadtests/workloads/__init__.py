"""Benchmark workloads as plain data (:class:`BenchRequest`): SGLang's generated-shared-prefix,
multi-round chat, and the Mooncake trace. The HTTP driver, the locust file and the trace replayer
all consume the same requests."""

from loadtests.workloads.mooncake import DEFAULT_TRACE, block_text, mooncake_prompt, mooncake_trace
from loadtests.workloads.multi_round import multi_round_chat
from loadtests.workloads.request import BenchRequest, dump_jsonl, load_jsonl, prompt_text
from loadtests.workloads.shared_prefix import generated_shared_prefix, zipf_group_sizes
from loadtests.workloads.text import filler_text, filler_words, vocabulary

__all__ = [
    "DEFAULT_TRACE",
    "BenchRequest",
    "block_text",
    "dump_jsonl",
    "filler_text",
    "filler_words",
    "generated_shared_prefix",
    "load_jsonl",
    "mooncake_prompt",
    "mooncake_trace",
    "multi_round_chat",
    "prompt_text",
    "vocabulary",
    "zipf_group_sizes",
]
