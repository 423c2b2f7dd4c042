"""Kernels: which of our compiled kernels the serving path uses, decided once and held by the model.

The choice ($SMOLLM2_ATTENTION_KERNEL or paged_kernel.set_attention_kernel, and whether the C++ library
builds here) is read only when a Kernels is made: prepare_for_serving() makes one per model, and the
linears, the layer loop and the attention metadata take it as a value from there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from model import paged_kernel


@dataclass(frozen=True, slots=True)
class Kernels:
    cpp: bool = False  # our C++ library: paged attention, fused element-wise ops, int8 LM head, argmax
    # its AVX512-BF16 GEMM (needs the instructions as well as the library). Not on CPUs with AMX: there
    # oneDNN's bf16 GEMM runs on the tile unit and is several times faster from a few rows up.
    bf16_gemm: bool = False

    @classmethod
    def detect(cls, device: torch.device) -> Kernels:
        """What this process may use on `device`; builds the C++ library on the first call (CPU only)."""
        cpp = paged_kernel.use_kernel(device)
        ours = cpp and bool(torch.ops.smollm2.bf16_gemm_available())
        return cls(cpp=cpp, bf16_gemm=ours and not cpu_has_amx())


@functools.cache
def cpu_has_amx() -> bool:
    """The CPU has AMX tiles for bf16 (Intel Xeon from Sapphire Rapids on), as Linux reports it."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return "amx_bf16" in flags.split()


TORCH_ONLY = Kernels()  # plain torch ops: CUDA, or SMOLLM2_ATTENTION_KERNEL=torch
