"""A disk cache of models prepared for serving on CPU, so that a start or an engine restart after the
first one skips the slow part (dequantizing the GGUF, packing GEMM tiles, building int4/int8 copies).

The prepared model keeps only what serving reads (`drop_unpacked_weights`: the packed, int4 and int8
copies, not the plain layer weights nor the embedding, whose rows the LM head's tiles hold). It is saved with `torch.save` under
``$SMOLLM2_HOME/prepared/`` and read back with `torch.load(weights_only=False)`: the file is one this
program wrote, in the user's own cache folder. Its name holds a hash of everything the result depends on: the source file (path, size,
modification time), dtype and quantization options, the torch version, this package's source code and
the CPU's instruction-set flags. A stale or unreadable file is rebuilt; older files of the same model
are removed when a new one is written, and so are all but the KEEP_ENTRIES most recently used ones (each
is ~370 MB for the default model: one per model path, dtype and option set would add up without end).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from model.defaults import cache_dir
from model.kernels import Kernels, cpu_flags_line
from model.modeling import SmolLM2ForCausalLM

log = logging.getLogger("model")
_PACKAGE = Path(__file__).resolve().parent
KEEP_ENTRIES = 4
# A .tmp file this old is a write that died (a crash, a kill): a live write takes seconds.
_STALE_TMP_S = 3600.0


def load_prepared(
    source: str,
    dtype: str,
    device: str,
    int4_small_batch: str,
    int8_lm_head: str,
    use_cache: bool = True,
    batch_invariant: bool = False,
) -> SmolLM2ForCausalLM:
    """`load_model(source)` + `prepare_for_serving(...)` + `drop_unpacked_weights()`, through the disk
    cache on CPU: a model for serving only. batch_invariant: prepared for Kernels.batch_invariant (no int4
    or int8 copies); a ValueError before any loading where this device or dtype cannot have it."""
    kernels: Kernels | None = None
    if batch_invariant:
        if dtype != "bfloat16":
            raise ValueError(f"--batch-invariant serves bfloat16 only, not {dtype}")
        kernels = Kernels.detect(torch.device(device), batch_invariant=True)
    if not use_cache or device != "cpu":
        return _build(source, dtype, device, int4_small_batch, int8_lm_head, kernels)
    path = prepared_path(source, dtype, int4_small_batch, int8_lm_head, batch_invariant)
    if path.exists():
        t0 = time.perf_counter()
        try:
            model = torch.load(path, weights_only=False, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - a damaged cache entry is rebuilt, not fatal
            log.warning("prepared model %s unreadable (%s): rebuilding it", path.name, exc)
        else:
            # The packed weights assume the kernels they were prepared for; detecting them here also
            # loads the C++ library into this process.
            expected = kernels if kernels is not None else Kernels.detect(torch.device("cpu"))
            if isinstance(model, SmolLM2ForCausalLM) and model.kernels == expected:
                log.info("prepared model read from the cache in %.1f s", time.perf_counter() - t0)
                _mark_used(path)
                return model.eval()
            log.warning("prepared model %s was made for other kernels: rebuilding it", path.name)
    model = _build(source, dtype, device, int4_small_batch, int8_lm_head, kernels)
    _save(model, path)
    return model


def _build(
    source: str, dtype: str, device: str, int4: str, int8: str, kernels: Kernels | None = None
) -> SmolLM2ForCausalLM:
    from model.weights import load_model  # gguf, numpy, safetensors: only a build needs them

    t0 = time.perf_counter()
    model = load_model(source, dtype, device)
    model.prepare_for_serving(int4_small_batch=int4, int8_lm_head=int8, kernels=kernels)
    freed = model.drop_unpacked_weights()  # the served model is never trained
    log.info(
        "model loaded and prepared for serving in %.1f s (%.0f MB of unpacked weights dropped)",
        time.perf_counter() - t0,
        freed / 1e6,
    )
    return model


def _save(model: SmolLM2ForCausalLM, path: Path) -> None:
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            torch.save(model, f)
        os.replace(tmp, path)  # readers see the whole file or none
        for old in path.parent.glob(path.name.rsplit("-", 1)[0] + "-*.pt"):
            if old != path:
                old.unlink(missing_ok=True)
        _mark_used(path)
        log.info("prepared model cached as %s (%.0f MB)", path, path.stat().st_size / 1e6)
        _evict(path)
    # A read-only or full disk only costs the next start its time. torch.save reports a full disk as a
    # RuntimeError of its zip writer ("unexpected pos ..."), not as an OSError.
    except (OSError, RuntimeError) as exc:
        log.warning("could not cache the prepared model in %s: %s", path.parent, exc)
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _mark_used(path: Path) -> None:
    """Record a use in the file's access time (set here: relatime and noatime mounts do not on reads), and
    leave its modification time alone, which says when it was written."""
    try:
        stat = path.stat()
        os.utime(path, ns=(time.time_ns(), stat.st_mtime_ns))
    except OSError:
        pass  # only the eviction order suffers


def _evict(keep: Path) -> None:
    """Remove all but the KEEP_ENTRIES most recently used entries (`keep`, just written, always stays),
    and .tmp files of writes that died. A server using a removed entry is unaffected: torch.load read the
    whole file into memory (no mmap), and on POSIX a file still open for reading lives until closed."""
    folder = keep.parent
    entries = []
    for entry in folder.glob("*.pt"):
        try:
            entries.append((entry.stat().st_atime_ns, entry))
        except OSError:
            continue  # removed meanwhile by another server
    entries.sort(reverse=True)
    kept = 1
    for _, entry in entries:
        if entry == keep:
            continue
        if kept < KEEP_ENTRIES:
            kept += 1
            continue
        try:
            entry.unlink(missing_ok=True)
        except OSError as exc:  # another user's file, a read-only folder: the cache only grows
            log.warning("could not remove prepared model %s: %s", entry.name, exc)
            continue
        log.info("prepared model %s removed from the cache (least recently used)", entry.name)
    now = time.time()
    for tmp in folder.glob("*.tmp"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_S:
                tmp.unlink(missing_ok=True)
        except OSError:
            continue


def prepared_path(source: str, dtype: str, int4: str, int8: str, batch_invariant: bool = False) -> Path:
    digest = hashlib.sha256()
    kernel_choice = os.environ.get("SMOLLM2_ATTENTION_KERNEL", "auto")
    # the batch-invariant model holds no int4/int8 copies: its own file, not the default one's
    mode = "batch-invariant" if batch_invariant else "default"
    for part in (_source_identity(Path(source)), dtype, int4, int8, torch.__version__, _code_identity(),
                 _cpu_identity(), kernel_choice, mode):  # fmt: skip
        digest.update(part.encode())
        digest.update(b"\0")
    # a name of its own, so that writing one mode's file does not remove the other's (_save)
    stem = Path(source).name.replace("-", "_") + ("_batch_invariant" if batch_invariant else "")
    return cache_dir() / "prepared" / f"{stem}-{digest.hexdigest()[:20]}.pt"


def _source_identity(source: Path) -> str:
    source = source.resolve()
    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    return "|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def _code_identity() -> str:
    digest = hashlib.sha256()
    for path in sorted([*_PACKAGE.glob("*.py"), *_PACKAGE.glob("csrc/*")]):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _cpu_identity() -> str:
    return cpu_flags_line() or torch.backends.cpu.get_cpu_capability()
