"""Running a heavy op on more threads than the step's small ops use.

On the 2-core CPU this project targets, a step's ~3,000 small ops run best on one thread (a second
OpenMP thread costs more in wake-ups than it gives), while the GEMMs, attention and the element-wise ops
of long prefill steps run ~2x faster on both cores (bench/NOTES.md). `torch.set_num_threads()` only sets
OpenMP's thread count for the calling thread (~0.1 us), so a heavy call switches it up and back around
itself. How many threads that is belongs to the model's `Kernels` (`Kernels.compute_threads`, set by
`SmolLM2ForCausalLM.use_compute_threads`); this module keeps no state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

# Element-wise ops (norms, RoPE, SwiGLU) over at least this many rows also run on the compute threads: a
# prefill chunk's hundreds of rows split well, while a decode step's few rows cost less than the wake-up.
WIDE_ROWS = 128


def run_on(threads: int | None, fn: Callable[..., T], *args: object) -> T:
    """fn(*args) with OpenMP's thread count at `threads` for the call (None: as it is), then back."""
    if threads is None:
        return fn(*args)
    others = torch.get_num_threads()
    if others == threads:
        return fn(*args)
    torch.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(others)
