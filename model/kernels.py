"""Kernels: which of our compiled kernels the serving path uses, decided once and held by the model.

The choice ($SMOLLM2_ATTENTION_KERNEL or paged_kernel.set_attention_kernel, and whether the C++ library
builds here) is read only when a Kernels is made: prepare_for_serving() makes one per model, and the
linears, the layer loop and the attention metadata take it as a value from there.

batch_invariant (--batch-invariant) asks for one kernel per operation whatever the step holds, each
reducing a row in an order that depends only on that row, so a greedy request gives the same tokens alone,
in any batch and after a prefix-cache hit:
- every linear (layers and LM head) goes through the bf16 tile GEMM (model/csrc/bf16_gemm.cpp), never the
  int4 or int8 copies nor oneDNN: each output element is one float32 accumulator over K in k order (on
  AMX CPUs the tile unit's, in blocks of 32 k, for every row count alike); rows are blocked and threads
  split only the output columns, so M changes neither the order nor the kernel;
- every query row (prefill, chunk, prefix-cache continuation, decode, draft) goes through the paged
  attention kernel (model/csrc/paged_attention.cpp) in one call per step (attention.step_rows), never SDPA:
  a row's keys are reduced in tiles of 16 from position 0, with its own online softmax, whatever the
  other rows are;
- norms, RoPE, SwiGLU and the greedy argmax are per row already (model/csrc/fused_ops.cpp, quant_ops.cpp).
It needs the C++ library with AVX512-BF16 (bfloat16 weights on CPU); without it the mode is refused, as
no other path here promises a row's result independent of the batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from model import paged_kernel
from model.threads import WIDE_ROWS, run_on

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Kernels:
    cpp: bool = False  # our C++ library: paged attention, fused element-wise ops, int8 LM head, argmax
    # its bf16 GEMM (needs AVX512-BF16 as well as the library; on the AMX tile unit where the CPU has one
    # and Linux grants it, with the same packed tiles). Else oneDNN's.
    bf16_gemm: bool = False
    batch_invariant: bool = False  # one kernel per op for every batch (module docstring)
    # Threads for the GEMMs, attention and the element-wise ops of long steps, apart from torch's count for
    # the small ops (model/threads.py); None: no switching. A property of the process, not of the packed
    # weights, so it is not compared (a prepared model serves whatever the count).
    compute_threads: int | None = field(default=None, compare=False)

    def with_threads(self, threads: int | None) -> Kernels:
        if threads is not None and threads < 1:
            raise ValueError(f"compute threads must be at least 1, got {threads}")
        return dataclasses.replace(self, compute_threads=threads)

    def wide(self, fn: Callable[..., T], *args: object) -> T:
        """fn(*args) on the compute threads."""
        return run_on(self.compute_threads, fn, *args)

    def wide_rows(self, rows: int, fn: Callable[..., T], *args: object) -> T:
        """fn(*args), on the compute threads when it spans at least WIDE_ROWS rows."""
        return run_on(self.compute_threads, fn, *args) if rows >= WIDE_ROWS else fn(*args)

    @classmethod
    def detect(cls, device: torch.device, batch_invariant: bool = False) -> Kernels:
        """What this process may use on `device`; builds the C++ library on the first call (CPU only).
        batch_invariant: raises ValueError where the mode's kernels are missing."""
        cpp = paged_kernel.use_kernel(device)
        ours = cpp and has_bf16_gemm()
        if not batch_invariant:
            return cls(cpp=cpp, bf16_gemm=ours)
        if not ours:
            raise ValueError(
                "--batch-invariant needs the C++ kernels with the AVX512-BF16 GEMM on CPU (this "
                f"{device.type} device has {'them without the GEMM' if cpp else 'none of them'}); "
                "serve on such a CPU (--device cpu) or without --batch-invariant"
            )
        return cls(cpp=True, bf16_gemm=True, batch_invariant=True)


def has_bf16_gemm() -> bool:
    """Our AVX512-BF16 GEMM is built and runs on this CPU (whether or not Kernels.detect prefers it)."""
    return paged_kernel.use_kernel(torch.device("cpu")) and bool(torch.ops.smollm2.bf16_gemm_available())


@functools.cache
def cpu_flags_line() -> str:
    """The "flags" line of /proc/cpuinfo (the CPU's instruction-set extensions); "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def cpu_has_amx() -> bool:
    """The CPU has AMX tiles for bf16 (Intel Xeon from Sapphire Rapids on), as Linux reports it."""
    return "amx_bf16" in cpu_flags_line().split()


TORCH_ONLY = Kernels()  # plain torch ops: CUDA, or SMOLLM2_ATTENTION_KERNEL=torch
