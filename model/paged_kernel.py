"""The fused CPU decode-attention kernel (model/csrc/paged_attention.cpp): built on first use, or not used.

``SMOLLM2_ATTENTION_KERNEL`` picks the decode attention on CPU:

- ``auto`` (default): the C++ kernel when it builds; otherwise one warning and the torch path.
- ``cpp``: the C++ kernel; a failed build is an error.
- ``torch``: always the torch path (gather, baddbmm, softmax, bmm).

The same library holds the other C++ ops of the serving path (model/csrc/fused_ops.cpp: RMSNorm, RoPE,
SwiGLU, KV write; model/csrc/quant_ops.cpp: int8 LM head, argmax; model/csrc/bf16_gemm.cpp: the bf16 GEMM of the
layer linears and the LM head); ``torch`` mode uses none of them.

CUDA always takes the torch path. The kernels are compiled once per machine with torch.utils.cpp_extension
(needs a C++ compiler and ``ninja``, -O3 -march=native) into ``$SMOLLM2_KERNEL_CACHE`` if set, else
``$SMOLLM2_HOME/torch_extensions``, or a folder under the system temp dir when that is not writable (a
read-only model volume); a file lock keeps two processes from building at once, and later processes load
the built library.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

from model.defaults import cache_dir
from model.threads import run_on

log = logging.getLogger(__name__)

ENV_VAR = "SMOLLM2_ATTENTION_KERNEL"
KERNEL_CACHE_VAR = "SMOLLM2_KERNEL_CACHE"
MODES = ("auto", "cpp", "torch")
SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"
FUSED_SOURCE = Path(__file__).parent / "csrc" / "fused_ops.cpp"  # residual add + RMSNorm, RoPE
QUANT_SOURCE = Path(__file__).parent / "csrc" / "quant_ops.cpp"  # int8 LM head, row argmax
GEMM_SOURCE = Path(__file__).parent / "csrc" / "bf16_gemm.cpp"  # the bf16 GEMM of PackedLinear
INT4_SOURCE = Path(__file__).parent / "csrc" / "int4_gemm.cpp"  # its int4 GEMM for a few rows
PREFILL_SOURCE = Path(__file__).parent / "csrc" / "prefill_attention.cpp"  # prompts and chunks, bf16
LAYERS_SOURCE = Path(__file__).parent / "csrc" / "decode_layers.cpp"  # a step's layer loop in one call
SOURCES = (SOURCE, FUSED_SOURCE, QUANT_SOURCE, GEMM_SOURCE, INT4_SOURCE, PREFILL_SOURCE, LAYERS_SOURCE)
LIBRARY_NAME = "smollm2_paged_attention"
STAMP_NAME = "smollm2_sources.sha1"
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
_lock = threading.Lock()
_mode: str | None = None  # set_attention_kernel's choice; None: read the environment
_loaded: bool | None = None  # None: not tried yet in this process


def set_attention_kernel(mode: str | None) -> None:
    """Force 'auto', 'cpp' or 'torch' for this process; None goes back to $SMOLLM2_ATTENTION_KERNEL."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"attention kernel must be one of {MODES}, got {mode!r}")
    global _mode
    _mode = mode


def attention_kernel_mode() -> str:
    mode = _mode if _mode is not None else os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR} must be one of {MODES}, got {mode!r}")
    return mode


def use_kernel(device: torch.device) -> bool:
    """Whether decode attention on `device` goes through the C++ kernel (building it on first call)."""
    if device.type != "cpu":
        return False
    mode = attention_kernel_mode()
    if mode == "torch":
        return False
    if load():
        return True
    if mode == "cpp":
        raise RuntimeError(f"{ENV_VAR}=cpp but the C++ attention kernel failed to build (see the log)")
    return False


def ready(device: torch.device) -> bool:
    """use_kernel(device) without building: True only once this process has loaded the kernels."""
    return device.type == "cpu" and _loaded is True and attention_kernel_mode() != "torch"


def load() -> bool:
    """Build (or load the cached build of) the kernel once per process; False, with one warning, if not."""
    global _loaded
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is None:
            try:
                _build_and_load()
                _loaded = True
            except Exception as e:  # no compiler, no ninja, a compile error: serve on the torch path
                log.warning("C++ paged attention kernel unavailable (%s); using the torch path", e)
                _loaded = False
    return _loaded


def _build_dir() -> Path:
    """One folder per torch version and CPU: the build is -march=native, so a shared home must not mix."""
    flags = ""
    if Path("/proc/cpuinfo").is_file():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next((ln for ln in lines if ln.startswith(("flags", "Features"))), "")
    tag = hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]
    return _kernel_root() / f"paged_attention-torch{torch.__version__}-{tag}"


def _kernel_root() -> Path:
    """$SMOLLM2_KERNEL_CACHE, else $SMOLLM2_HOME/torch_extensions if it can be written, else the temp dir."""
    if os.environ.get(KERNEL_CACHE_VAR):
        return Path(os.environ[KERNEL_CACHE_VAR]).expanduser()
    root = cache_dir() / "torch_extensions"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"smollm2-torch-extensions-{os.getuid()}"
    # a build takes tens of seconds: say where it goes, since the temp dir may not outlive the machine
    log.warning("%s cannot be written: the kernels are built in %s (set %s to keep them)", root, fallback,
                KERNEL_CACHE_VAR)  # fmt: skip
    return fallback


def _in_process() -> bool:
    return hasattr(torch.ops.smollm2, "paged_decode_attention")


def _build_and_load() -> None:
    if _in_process():
        return
    build = _build_dir()
    build.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(build) + ".lock", timeout=600):
        library = build / f"{LIBRARY_NAME}.so"
        stamp = build / STAMP_NAME
        current = _build_stamp(library)
        if current and stamp.is_file() and stamp.read_text() == current:
            # Up to date: load it directly. cpp_extension.load would import setuptools and run ninja
            # only to find nothing to do, about a second of every start.
            torch.ops.load_library(str(library))
            return
        # torch's own lock file for the build: while we hold ours no other process builds here, so one
        # left is a build that died (a process killed mid-compile), and torch would wait on it for ever
        (build / "lock").unlink(missing_ok=True)
        _compile_and_load(build)
        stamp.write_text(_build_stamp(library))


def _compile_and_load(build: Path) -> None:
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        try:  # the pip package puts ninja next to the interpreter, which may not be on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja not found (pip install ninja)")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError("no C++ compiler (c++ or $CXX) on PATH")
    first = not any(build.glob("*.so"))
    if first:
        log.info("building C++ kernels (first start, ~30 s)...")
    t0 = time.perf_counter()
    cpp_extension.load(
        name=LIBRARY_NAME,
        sources=[str(p) for p in SOURCES],
        extra_cflags=_CFLAGS + [f"-DSMOLLM2_HEADERS={_headers_hash()}"],
        extra_ldflags=_LDFLAGS,
        build_directory=str(build),
        is_python_module=False,
        verbose=False,
    )
    if first:
        log.info("C++ kernels built in %.0f s", time.perf_counter() - t0)


def _build_stamp(library: Path) -> str:
    """What the built library depends on besides torch and the CPU (the folder's name holds those): the
    sources, headers and flags, and the library file itself (size, time), so that a build by another
    checkout sharing the folder is not taken for ours. Written after a build; while it matches, the
    library is loaded as it is. "" when there is no library."""
    try:
        info = library.stat()
    except OSError:
        return ""
    digest = hashlib.sha1()
    for path in [*SOURCES, *sorted(SOURCE.parent.glob("*.h"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    return f"{digest.hexdigest()} {info.st_size} {info.st_mtime_ns}"


def _headers_hash() -> str:
    """A hash of csrc/*.h, passed as a define: torch's JIT build decides to rebuild from the sources and
    flags only, so a header edit must change the flags."""
    digest = hashlib.sha1()
    for header in sorted(SOURCE.parent.glob("*.h")):
        digest.update(header.read_bytes())
    return digest.hexdigest()[:12]


def prefill_kernel_available() -> bool:
    """Prompt chunks can go through the prompt kernel (model/csrc/prefill_attention.cpp: AVX512-BF16, or the
    AMX tile unit) on this CPU."""
    return load() and bool(torch.ops.smollm2.prefill_attention_available())


def prefill_attention_kernel(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_len: int,
    block_size: int,
    threads: int | None = None,
) -> torch.Tensor:
    """q (T, nh, 64) scaled bf16, the chunk's queries at positions context_len - T .. context_len - 1, whose
    keys and values are already in kv_cache (bf16) -> (T, nh * 64): causal attention over the sequence's
    first context_len tokens. threads: as for paged_decode_attention."""
    op = torch.ops.smollm2.prefill_attention
    return run_on(threads, op, q, kv_cache, block_table, context_len, block_size)


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    threads: int | None = None,
) -> torch.Tensor:
    """q (D, nh, hd) scaled, kv_cache (2 nkv, slots, hd), block_tables (D, nb), context_lens (D,) -> (D, nh*hd).

    Row d attends to the first context_lens[d] tokens of its table; a table with row stride 0 (expand)
    is read without a copy. threads: OpenMP threads for the call (Kernels.compute_threads; None: as set).
    """
    if not load():
        raise RuntimeError("the C++ paged attention kernel is not available (see the log)")
    return run_on(
        threads, torch.ops.smollm2.paged_decode_attention, q, kv_cache, block_tables, context_lens, block_size
    )
