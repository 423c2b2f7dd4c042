"""Threads for the serving path's heavy kernels (GEMMs, paged attention) apart from its small ops.

On the 2-core CPU this project targets, a step's ~3,000 small ops run best on one thread (a second
OpenMP thread costs more in wake-ups than it gives), while the GEMMs and the attention kernel run ~2x
faster on both cores (bench/NOTES.md). `torch.set_num_threads()` only sets OpenMP's thread count for
the calling thread (~0.1 us), so the heavy calls switch it up and back around themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")
_compute_threads: int | None = None


def set_compute_threads(threads: int | None) -> None:
    """Run GEMMs and the attention kernel on `threads` threads whatever torch.get_num_threads() says for
    the other ops; None (the default): no switching."""
    global _compute_threads
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    _compute_threads = threads


def get_compute_threads() -> int | None:
    return _compute_threads


def run_wide(fn: Callable[..., T], *args: object) -> T:
    """fn(*args) on the compute threads."""
    threads = _compute_threads
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


# Element-wise ops (norms, RoPE, SwiGLU) over at least this many rows also run on the compute threads: a
# prefill chunk's hundreds of rows split well, while a decode step's few rows cost less than the wake-up.
WIDE_ROWS = 128


def run_wide_rows(rows: int, fn: Callable[..., T], *args: object) -> T:
    """fn(*args), on the compute threads when it spans at least WIDE_ROWS rows."""
    return run_wide(fn, *args) if rows >= WIDE_ROWS else fn(*args)
