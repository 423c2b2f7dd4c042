"""The serving benchmark's workloads: prompt lengths measured with the real tokenizer, prefixes shared or
not as each load needs, and the summary math on synthetic request results (no server)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from bench.peers import LlamaCppPeer, OursPeer
from bench.serve_bench import (
    LONG_MAX_TOKENS_IN_MIXED,
    LoadResult,
    RequestResult,
    make_long_prompt,
    make_long_prompts,
    make_plan,
    make_system_prompt,
    make_user_messages,
    parse_args,
    percentile,
    prefill_figures,
    prefill_lines,
    prompts_used,
    results_table,
    summarize,
    workload_configs,
)
from model.tokenizer import Tokenizer

BLOCK = 16  # tokens per KV block: the prefix cache reuses whole blocks only


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def test_long_prompts_are_about_1500_tokens(tokenizer: Tokenizer) -> None:
    indices = [0, 1, 7, 63, 1_000_000]  # measured runs and warm-ups draw from both ranges
    lengths = [len(tokenizer.encode(make_long_prompt(i))) for i in indices]
    assert all(1400 <= n <= 1600 for n in lengths), lengths
    assert 450 <= len(tokenizer.encode(make_long_prompt(3, tokens=500))) <= 550


def test_long_prompts_are_deterministic_and_share_no_cacheable_prefix(tokenizer: Tokenizer) -> None:
    prompts = make_long_prompts(8, start=5)
    assert prompts == make_long_prompts(8, start=5) and prompts[0] == make_long_prompt(5)
    ids = [tokenizer.encode(p) for p in prompts]
    longest = max(common_prefix(a, b) for a, b in itertools.combinations(ids, 2))
    assert longest < BLOCK  # not one full KV block in common
    # Not only the numbered opening differs: the bodies are different orderings of the text.
    bodies = {p.split(":", 1)[1][:200] for p in prompts}
    assert len(bodies) == len(prompts)


def test_shared_prefix_chats_share_the_system_prompt(tokenizer: Tokenizer) -> None:
    system = make_system_prompt()
    assert system == make_system_prompt()
    assert 900 <= len(tokenizer.encode(system)) <= 1100
    users = make_user_messages(6)
    assert len(set(users)) == 6 and users == make_user_messages(6)
    assert all(len(tokenizer.encode(u)) <= 64 for u in users)
    rendered = [
        tokenizer.encode(
            tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": u}]
            )
        )
        for u in users
    ]
    assert all(1000 <= len(r) <= 1200 for r in rendered), [len(r) for r in rendered]
    shared = [common_prefix(a, b) for a, b in itertools.combinations(rendered, 2)]
    # Every pair shares the whole system turn; only the user message differs.
    assert min(shared) >= len(tokenizer.encode(system))
    assert max(shared) < min(len(r) for r in rendered) - 10


def _req(ttft: float, gaps: list[float], out: int, prompt: int | None, ok: bool = True) -> RequestResult:
    return RequestResult(
        ok=ok, start=0.0, end=0.0, ttft=ttft, chunk_gaps=gaps, output_tokens=out, prompt_tokens=prompt
    )


def test_summary_counts_prompt_tokens_of_completed_requests_with_usage() -> None:
    results = [
        _req(0.1, [0.01, 0.02], 3, 1500),
        _req(0.3, [0.03], 2, 1400),
        _req(0.2, [], 1, None),  # no usage block: counted in output, not in prompt tokens
        _req(0.9, [0.5], 9, 1000, ok=False),  # failed: counted as an error only
    ]
    for r, end in zip(results, (1.0, 2.0, 1.5, 3.0), strict=True):
        r.end = end
    res = summarize(4, results, t0=0.0)
    assert (res.completed, res.errors, res.output_tokens) == (3, 1, 6)
    assert res.duration_s == pytest.approx(3.0)  # first send to the last request's end
    assert (res.prompt_tokens, res.prompt_counted) == (2900, 2)
    assert res.prompt_tokens_per_req == pytest.approx(1450)
    assert res.prompt_tok_per_s == pytest.approx(2900 / 3.0)
    assert res.ttft_ms == pytest.approx([100, 300, 200])
    assert res.itl_ms == pytest.approx([10, 20, 30])
    d = res.to_dict()
    assert d["ttft_p50_ms"] == pytest.approx(200) and d["ttft_p99_ms"] == pytest.approx(298)
    assert d["itl_p50_ms"] == pytest.approx(20) and d["itl_p99_ms"] == pytest.approx(29.8)
    assert d["prompt_tok_per_s"] == pytest.approx(966.7) and "long" not in d
    none = summarize(1, [_req(0.1, [], 1, None)], t0=0.0)
    assert none.prompt_tok_per_s is None and none.prompt_tokens_per_req is None


def test_prefill_probe_figures() -> None:
    cell = LoadResult(1, 2.0, 3, 0, 3, [400.0, 500.0, 600.0], [], prompt_tokens=4500, prompt_counted=3)
    ttft, tok_s = prefill_figures(cell)
    assert ttft == pytest.approx(500) and tok_s == pytest.approx(3000)  # 1,500 tokens in 500 ms
    lines = prefill_lines({"ours": cell, "vllm": "unavailable: not installed"}, 3)
    assert "TTFT p50 500.0 ms, 3000 prompt tok/s" in lines[0] and "3 of 3 ok" in lines[0]
    assert lines[1] == "vllm prefill probe: unavailable: not installed"
    assert prefill_figures(LoadResult(1, 1.0, 0, 1, 0, [], [])) == (None, None)


def test_mixed_table_reports_the_long_prompts_apart() -> None:
    short = LoadResult(
        32, 10.0, 64, 0, 8192, [100.0, 200.0], [40.0, 60.0, 500.0], prompt_tokens=4096, prompt_counted=64
    )
    short.long = LoadResult(
        32, 10.0, 3, 1, 48, [900.0, 1000.0, 1100.0], [], prompt_tokens=4500, prompt_counted=3
    )
    table: dict[str, dict[int, LoadResult | str]] = {"ours": {32: short}, "vllm": {32: "unavailable: x"}}
    text = results_table(table, [32], "mixed")
    head, _, ours, vllm = text.splitlines()
    assert "long TTFT p50" in head and "prompt tok/s" in head
    assert {line.count("|") for line in text.splitlines()} == {18}  # 17 columns
    cells = [c.strip() for c in ours.strip("|").split("|")]
    assert cells[:6] == ["ours", "32", "819.2", "6.40", "64", "409.6"]
    assert cells[10:15] == ["3", "1500", "1000.0", "1098.0", "1"]  # long n, prompt, TTFT p50/p99, errors
    assert "unavailable: x" in vllm
    assert percentile(short.itl_ms, 99) == pytest.approx(491.2)  # the short streams' stall shows in ITL p99
    assert short.to_dict()["long"]["completed"] == 3


class _Peer:
    def extra_body(self, max_tokens: int) -> dict[str, Any]:
        return {"ignore_eos": True, "n": max_tokens}


@pytest.mark.parametrize("workload", ["short", "long", "shared-prefix", "mixed"])
def test_workload_configs(workload: str) -> None:
    plan = make_plan(parse_args(["--workload", workload, "--peers", "ours", "--requests-per-client", "1"]))
    assert plan.workload == workload and plan.deadline_s == (150.0 if workload == "short" else 300.0)
    cfg, long = workload_configs(plan, 8, "http://127.0.0.1:1", "m", _Peer(), first=10)
    assert cfg.concurrency == 8 and cfg.num_requests == 8 and cfg.max_tokens == 128
    assert cfg.extra_body == {"ignore_eos": True, "n": 128}
    if workload == "long":
        assert cfg.prompts == make_long_prompts(8, 10) and prompts_used(plan, 8) == 8
    if workload == "shared-prefix":
        assert cfg.system_prompt == make_system_prompt() and cfg.prompts == make_user_messages(8, 10)
    else:
        assert cfg.system_prompt is None
    if workload == "mixed":
        assert long is not None and long.num_requests == plan.long_requests == prompts_used(plan, 8) == 8
        assert long.max_tokens == LONG_MAX_TOKENS_IN_MIXED and long.prompts == make_long_prompts(8, 10)
        assert plan.extra_slots == 8
    else:
        assert long is None and plan.extra_slots == 0
    assert plan.context_per_slot == (256 if workload == "short" else 2048)


def test_peers_get_room_for_long_prompts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SMOLLM2_MODEL", str(tmp_path / "m.gguf"))
    monkeypatch.delenv("SMOLLM2_KV_CACHE_MEMORY", raising=False)
    ours = OursPeer()
    assert "--kv-cache-memory" not in ours.argv(1, 32)  # the short load keeps the server's defaults
    ours.context_per_slot = 2048
    assert ours.argv(1, 32)[-2:] == ["--kv-cache-memory", "2GiB"]
    monkeypatch.setenv("SMOLLM2_KV_CACHE_MEMORY", "1GiB")  # the user's size wins
    assert "--kv-cache-memory" not in ours.argv(1, 32)

    llama = LlamaCppPeer()
    monkeypatch.setattr(LlamaCppPeer, "server_binary", lambda self: Path("/x/llama-server"))
    monkeypatch.setattr("bench.peers.require_default_model", lambda: tmp_path / "m.gguf")
    argv = llama.argv(1, 32)
    assert argv[argv.index("-np") + 1] == "32" and argv[argv.index("-c") + 1] == "8192"
    llama.context_per_slot, llama.extra_slots = 2048, 8
    argv = llama.argv(1, 32)
    assert argv[argv.index("-np") + 1] == "40" and argv[argv.index("-c") + 1] == str(40 * 2048)
