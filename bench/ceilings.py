"""This machine's own ceilings, measured in a few seconds before a benchmark runs.

The issue's roofline figures (2,300 tok/s at 32 streams, a 5 ms single-stream floor) were
measured on a Zen 5 host. Hosts of the same size differ: a Zen 4 EPYC runs
512-bit bf16 dot products on 256-bit units, so it has about half the bf16 GEMM rate per clock. The
benchmarks therefore print our fraction of both: the issue's figures and this machine's, measured here.

    python -m bench.ceilings
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# SmolLM2-135M: multiply-adds per decoded token (the tied 49152 x 576 LM head included) and the bytes
# of its weights in bf16, read once per single-stream decode step.
FLOP_PER_TOKEN = 0.27e9
BF16_WEIGHT_BYTES = 270e6


@dataclass
class Ceilings:
    cpu: str
    threads: int
    gemm_gflops_m32: float  # packed bf16 GEMM, M=32 x K=576 x N=3072, weight in cache, best over 1 s
    read_gb_s: float  # sum over a 256 MiB float32 tensor, best over 0.5 s

    @property
    def decode_tok_s_at_32(self) -> float:
        return self.gemm_gflops_m32 * 1e9 / FLOP_PER_TOKEN

    @property
    def single_stream_floor_ms(self) -> float:
        return BF16_WEIGHT_BYTES / (self.read_gb_s * 1e9) * 1e3

    def describe(self) -> str:
        return (
            f"this machine ({self.cpu}, {self.threads} threads): bf16 GEMM {self.gemm_gflops_m32:.0f} GFLOPS at M=32 "
            f"-> decode ceiling {self.decode_tok_s_at_32:,.0f} tok/s at 32 streams; memory read "
            f"{self.read_gb_s:.1f} GB/s -> bf16 single-stream floor {self.single_stream_floor_ms:.1f} ms/token"
        )


def cpu_name() -> str:
    """Model name plus family/model (family 25 is Zen 3/4, 26 is Zen 5 on AMD), else platform's word."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model") and key not in info:
                info[key] = value.strip()
            if len(info) == 3:
                break
    except OSError:
        pass
    if "model name" not in info:
        return platform.processor() or platform.machine()
    return f"{info['model name']}, family {info.get('cpu family', '?')} model {info.get('model', '?')}"


def _best(fn, repeats: int, warmup: int = 3, min_seconds: float = 0.0) -> float:  # type: ignore[no-untyped-def]
    """Fastest of `repeats` calls, going on until `min_seconds` have passed: this VM's second core is
    sometimes taken for a while, and a ceiling is what the machine does when it is not."""
    for _ in range(warmup):
        fn()
    best, start, n = float("inf"), time.perf_counter(), 0
    while n < repeats or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        n += 1
    return best


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def measure() -> Ceilings:
    """About two seconds on a 2-core CPU, on every core this process may use (whatever torch's thread
    count is now; it is restored); run it while the machine is otherwise quiet."""
    threads = torch.get_num_threads()
    torch.set_num_threads(_cores())
    try:
        return _measure()
    finally:
        torch.set_num_threads(threads)


def _measure() -> Ceilings:
    M, K, N = 32, 576, 3072
    w = torch.randn(N, K).to(torch.bfloat16)
    x = torch.randn(M, K).to(torch.bfloat16)

    def gemm() -> torch.Tensor:
        return torch.nn.functional.linear(x, w)

    if torch.backends.mkldnn.is_available():
        try:  # oneDNN's bf16 path needs AVX512 (or AVX-NE-CONVERT); elsewhere torch's own GEMM is the ceiling
            packed = torch.ops.mkldnn._reorder_linear_weight(w, M)
        except RuntimeError:
            pass
        else:

            def gemm() -> torch.Tensor:
                return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

    t_gemm = _best(gemm, 50, warmup=10, min_seconds=1.0)
    big = torch.ones(64 << 20)  # 256 MiB of float32: well past any L3
    t_read = _best(big.sum, 5, min_seconds=0.5)
    return Ceilings(
        cpu=cpu_name(),
        threads=torch.get_num_threads(),
        gemm_gflops_m32=2 * M * K * N / t_gemm / 1e9,
        read_gb_s=big.numel() * big.element_size() / t_read / 1e9,
    )


if __name__ == "__main__":
    print(measure().describe())
