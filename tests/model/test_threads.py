"""Compute threads: heavy kernels switch to the model's thread count and back; other ops keep theirs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from model.kernels import TORCH_ONLY, Kernels
from model.threads import WIDE_ROWS, cgroup_cpu_quota, cgroup_memory, cpu_limits_text, run_on, usable_cpus


@pytest.fixture(autouse=True)
def _restore():  # type: ignore[no-untyped-def]
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_heavy_calls_run_on_the_compute_threads_and_switch_back() -> None:
    torch.set_num_threads(1)
    kernels = TORCH_ONLY.with_threads(2)
    assert kernels.wide(torch.get_num_threads) == 2
    assert torch.get_num_threads() == 1  # the small ops' count is back
    assert kernels.wide_rows(WIDE_ROWS, torch.get_num_threads) == 2  # a long step's element-wise ops
    assert kernels.wide_rows(WIDE_ROWS - 1, torch.get_num_threads) == 1  # a decode step's stay


def test_the_count_is_restored_when_the_call_raises() -> None:
    torch.set_num_threads(1)

    def boom() -> None:
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError, match="kernel failed"):
        run_on(2, boom)
    assert torch.get_num_threads() == 1


def test_no_compute_threads_means_no_switch() -> None:
    torch.set_num_threads(1)
    assert TORCH_ONLY.wide(torch.get_num_threads) == 1
    with pytest.raises(ValueError, match="at least 1"):
        TORCH_ONLY.with_threads(0)


def test_the_thread_count_is_not_part_of_what_the_kernels_are() -> None:
    """A prepared model cached by one process serves in another whatever its core count."""
    assert Kernels(cpp=True).with_threads(8) == Kernels(cpp=True)


def test_whole_prompt_attention_runs_on_the_compute_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh prompts' causal attention (SDPA) was ~13% of a mixed 28-decode + 4-prompt step on one thread."""
    from model import attention

    seen: list[int] = []
    sdpa = attention.F.scaled_dot_product_attention

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(torch.get_num_threads())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    torch.set_num_threads(1)
    q, kv = torch.randn(2 * 5, 6, 8), torch.randn(2 * 5, 4, 8)  # two prompts of 5 tokens, 6 heads, 2 KV heads
    seqs = [
        attention.PrefillSeq(0, 5, 5, torch.tensor([0])),
        attention.PrefillSeq(5, 5, 5, torch.tensor([1])),
    ]
    out = attention.fresh_prefill_attention(q, kv, seqs, threads=2)
    assert out.shape == (10, 48) and seen == [2] and torch.get_num_threads() == 1


def test_use_compute_threads_reaches_every_linear() -> None:
    from tests.tiny import make_tiny_model

    model = make_tiny_model(dtype=torch.bfloat16)
    model.prepare_for_serving()
    model.use_compute_threads(2)
    assert model.kernels is not None and model.kernels.compute_threads == 2
    linears = [*model._layer_linears(), model.lm_head_linear]
    assert all(lin is not None and lin.kernels.compute_threads == 2 for lin in linears)


def _fake_root(tmp_path, cgroup: str, files: dict[str, str]):  # type: ignore[no-untyped-def]
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    for rel, text in files.items():
        f = tmp_path / "sys/fs/cgroup" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return tmp_path


def test_a_container_cpu_quota_caps_the_threads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # `docker run --cpus 1.5` on cgroup v2: the container sees its own cgroup at the mount's top
    root = _fake_root(tmp_path, "0::/\n", {"cpu.max": "150000 100000\n"})
    assert cgroup_cpu_quota(root) == 1.5
    assert usable_cpus(root) == 1  # rounded down: a thread more than the quota spins on paused time
    assert "quota of 1.5" in cpu_limits_text(root)


def test_the_smallest_quota_on_the_path_counts_v2(tmp_path) -> None:  # type: ignore[no-untyped-def]
    root = _fake_root(
        tmp_path,
        "0::/kubepods/pod1/ctr\n",
        {"cpu.max": "max 100000\n", "kubepods/cpu.max": "400000 100000\n", "kubepods/pod1/ctr/cpu.max": "max 100000\n",
         "kubepods/pod1/cpu.max": "50000 100000\n"},
    )  # fmt: skip
    assert cgroup_cpu_quota(root) == 0.5
    assert usable_cpus(root) == 1  # never 0


def test_a_v1_quota_is_read_from_the_cpu_controller(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cgroup = "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n"
    root = _fake_root(
        tmp_path, cgroup, {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "100000\n", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"}
    )  # fmt: skip
    assert cgroup_cpu_quota(root) == 1.0
    assert usable_cpus(root) == 1


@pytest.mark.parametrize(
    "cgroup, files",
    [
        ("0::/\n", {"cpu.max": "max 100000\n"}),  # no limit
        ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}),  # v1, no limit
        ("0::/../../elsewhere\n", {"cpu.max": "max 100000\n"}),  # a cgroup outside this namespace
        ("0::/\n", {"cpu.max": "garbage\n"}),
        ("not a cgroup line\n", {}),
    ],
)
def test_no_readable_quota_leaves_the_affinity_mask(tmp_path, cgroup: str, files: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    root = _fake_root(tmp_path, cgroup, files)
    assert cgroup_cpu_quota(root) is None
    assert usable_cpus(root) == len(os.sched_getaffinity(0))


def test_the_affinity_mask_bounds_the_threads() -> None:
    # taskset / `--cpuset-cpus`: os.cpu_count() still counts the host's CPUs
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); from model.threads import usable_cpus; print(usable_cpus())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "1"


def test_a_cgroup_memory_limit_is_read_v1_and_v2(tmp_path) -> None:  # type: ignore[no-untyped-def]
    v2 = _fake_root(
        tmp_path / "v2", "0::/\n", {"memory.max": "1073741824\n", "memory.current": "500000000\n"}
    )
    assert cgroup_memory(v2) == (1 << 30, 500_000_000)
    v1 = _fake_root(
        tmp_path / "v1",
        "5:memory:/docker/abc\n",
        {"memory/docker/abc/memory.limit_in_bytes": "734003200\n", "memory/docker/abc/memory.usage_in_bytes": "1\n",
         "memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": "2\n"},
    )  # fmt: skip
    assert cgroup_memory(v1) == (734_003_200, 1)  # v1's "no limit" above it is not a limit
    assert cgroup_memory(_fake_root(tmp_path / "none", "0::/\n", {"memory.max": "max\n"})) is None


def test_a_memory_limit_too_small_for_the_kv_cache_is_a_warning_at_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    import model.threads
    from server import core_setup

    caplog.set_level(logging.INFO, logger="server")
    monkeypatch.setattr(model.threads, "cgroup_memory", lambda: (700 * 2**20, 0))
    core_setup._check_memory_limit(360 * 2**20)
    assert "the kernel may kill the engine" in caplog.text
    caplog.clear()
    monkeypatch.setattr(model.threads, "cgroup_memory", lambda: (64 * 2**30, 0))
    core_setup._check_memory_limit(360 * 2**20)
    assert "kill" not in caplog.text and "memory: cgroup limit 65536 MiB" in caplog.text
