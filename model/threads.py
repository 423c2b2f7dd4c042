"""Running a heavy op on more threads than the step's small ops use.

On the 2-core CPU this project targets, a step's ~3,000 small ops run best on one thread (a second
OpenMP thread costs more in wake-ups than it gives), while the GEMMs, attention and the element-wise ops
of long prefill steps run ~2x faster on both cores (bench/NOTES.md). `torch.set_num_threads()` only sets
OpenMP's thread count for the calling thread (~0.1 us), so a heavy call switches it up and back around
itself. How many threads that is belongs to the model's `Kernels` (`Kernels.compute_threads`, set by
`SmolLM2ForCausalLM.use_compute_threads`); this module keeps no state.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")
Q = TypeVar("Q")

# Element-wise ops (norms, RoPE, SwiGLU) over at least this many rows also run on the compute threads: a
# prefill chunk's hundreds of rows split well, while a decode step's few rows cost less than the wake-up.
WIDE_ROWS = 128


def usable_cpus(root: Path = Path("/")) -> int:
    """How many CPUs this process can keep busy at once: its affinity mask (taskset, a container's
    `--cpuset-cpus`), capped by the CPU quota of its cgroup (`docker run --cpus`, a Kubernetes CPU limit),
    rounded down, at least 1.

    `os.cpu_count()` counts the host's CPUs. OpenMP's workers spin while they wait for each other, a
    few hundred times a step; with more workers than the quota allows, the kernel pauses the container
    for the rest of each period while some of them spin, and a step takes many times as long. `root`
    is where /proc and /sys are found (tests give a directory of their own).
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        cpus = min(cpus, math.floor(quota))
    return max(1, cpus)


def cpu_limits_text(root: Path = Path("/")) -> str:
    """What bounds `usable_cpus()`, for the start-up log: the host's CPUs, the affinity mask, the quota."""
    parts = [f"{os.cpu_count()} on the host"]
    try:
        parts.append(f"{len(os.sched_getaffinity(0))} in its affinity mask")
    except (AttributeError, OSError):
        pass
    quota = cgroup_cpu_quota(root)
    parts.append("no cgroup CPU quota" if quota is None else f"a cgroup CPU quota of {quota:g}")
    return ", ".join(parts)


def cgroup_cpu_quota(root: Path = Path("/")) -> float | None:
    """The CPU quota (in CPUs) of this process's cgroup and the cgroups above it, the smallest of them;
    None when there is none or it cannot be read. cgroup v2 (`cpu.max`) and v1 (`cpu.cfs_quota_us`)."""
    quotas = _cgroup_limits(root, "cpu", ("cpu", "cpu,cpuacct", "cpuacct,cpu"), _v2_quota, _v1_quota)
    return min(quotas) if quotas else None


def cgroup_memory(root: Path = Path("/")) -> tuple[int, int] | None:
    """(limit, usage) in bytes of this process's cgroup memory limit, the smallest on its path (usage is
    that cgroup's); None without a limit or where it cannot be read. cgroup v2 and v1."""
    v2 = functools.partial(_memory, limit_file="memory.max", usage_file="memory.current")
    v1 = functools.partial(_memory, limit_file="memory.limit_in_bytes", usage_file="memory.usage_in_bytes")
    found = _cgroup_limits(root, "memory", ("memory",), v2, v1)
    return min(found) if found else None


def _cgroup_limits(
    root: Path,
    controller: str,
    v1_mounts: tuple[str, ...],
    read_v2: Callable[[Path], Q | None],
    read_v1: Callable[[Path], Q | None],
) -> list[Q]:
    """The limits `read_v2` / `read_v1` find along this process's cgroup paths (/proc/self/cgroup): v2's
    unified hierarchy ("0::/path") and v1's hierarchy of `controller`, under the first of `v1_mounts`."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    found: list[Q] = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":
            found += _quotas_up(root / "sys/fs/cgroup", path, read_v2)
        elif controller in controllers.split(","):
            for name in v1_mounts:
                mount = root / "sys/fs/cgroup" / name
                if mount.is_dir():
                    found += _quotas_up(mount, path, read_v1)
                    break
    return found


def _memory(d: Path, limit_file: str, usage_file: str) -> tuple[int, int] | None:
    try:
        limit = (d / limit_file).read_text().strip()
        usage = int((d / usage_file).read_text())
    except (OSError, ValueError):
        return None
    if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:  # v1 writes "no limit" as ~2**63
        return None
    return int(limit), usage


def _quotas_up(mount: Path, path: str, read: Callable[[Path], Q | None]) -> list[Q]:
    """The quotas of the cgroup at `path` under `mount` and of each cgroup above it. Inside a container
    the mount shows only the container's own cgroup, at the mount's top, whatever `path` says."""
    found: list[Q] = []
    parts = [p for p in path.strip("/").split("/") if p]
    if ".." in parts:  # a cgroup outside this namespace's view: only the mount's top is ours to read
        parts = []
    dirs = [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    for d in dirs:
        quota = read(d)
        if quota is not None:
            found.append(quota)
    return found


def _v2_quota(d: Path) -> float | None:
    try:
        quota, period = (d / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(d: Path) -> float | None:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


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
