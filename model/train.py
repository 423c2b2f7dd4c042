"""Training and fine-tuning SmolLM2, resumable exactly.

``python -m model.train --data corpus.txt --out-dir runs/x`` (console script ``smollm2-train``):

- data: ``.txt`` files (one document each) and ``.jsonl`` files (one document per line, ``--text-field``),
  tokenized with the model's tokenizer, EOS after each document, packed into ``block_size`` blocks; the last
  ``--val-fraction`` of the blocks is held out for validation. Block order: a permutation per epoch drawn
  from ``--seed``, so the order is the same on every run.
- model: ``--init scratch`` (spec defaults, or ``--config tiny.json``) or any source ``load_model`` reads.
- AdamW (decay on 2-D weights only), linear warmup + cosine decay, gradient accumulation and clipping,
  bfloat16 autocast (``--dtype bf16``) on CPU and CUDA.
- checkpoints every ``--save-every`` steps and on SIGINT/SIGTERM under ``out_dir/checkpoints/step_N``: an HF
  folder (``config.json``, ``model.safetensors``, tokenizer files) plus ``trainer_state.pt`` (optimizer,
  scheduler, RNG states, data position, step, config). Written to a temporary folder and renamed; the
  ``out_dir/latest`` pointer is replaced atomically after that, so a crash never leaves it pointing at a
  partial checkpoint. Rerunning the same command resumes from ``latest`` and reproduces the loss curve
  of an uninterrupted run.
- logs: a progress line on stderr, ``out_dir/log.csv`` (step, loss, lr, tokens/s, val_loss), sample
  generations in ``out_dir/samples.txt``; the result is an HF folder ``out_dir/final`` that ``load_model``
  and the server read.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.config import SmolLM2Config
from model.modeling import SmolLM2ForCausalLM

CHECKPOINT_FORMAT = 1
STATE_FILE = "trainer_state.pt"
LATEST = "latest"
CSV_FIELDS = ["step", "loss", "lr", "tokens_per_s", "val_loss", "elapsed_s"]
# Changing one of these makes the saved data position meaningless, so resuming refuses it.
RESUME_CRITICAL = ("seed", "block_size", "batch_size", "grad_accum", "val_fraction", "text_field")
DEFAULT_PROMPTS = ("Once upon a time", "The meaning of life is")


class TrainError(Exception):
    """A problem with the user's input (data, options, checkpoint), reported without a traceback."""


@dataclass
class TrainConfig:
    data: list[str] = field(default_factory=list)
    out_dir: str = "out"
    init: str = "scratch"  # "scratch", "default" (the default GGUF) or a path load_model reads
    config: str | None = None  # JSON model config for --init scratch (spec defaults when None)
    tokenizer: str | None = None  # None: the init source's tokenizer, else the default GGUF's
    text_field: str = "text"
    block_size: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "bf16"  # bf16 autocast over float32 weights, or plain fp32
    device: str = "auto"
    seed: int = 1337
    val_fraction: float = 0.0
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 100
    keep_last: int = 3
    export_every: int = 0
    sample_every: int = 0
    sample_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    sample_tokens: int = 32
    log_every: int = 10
    resume: str = "auto"  # "auto" (from out_dir/latest if present), "never", or a checkpoint folder

    def validate(self) -> None:
        positive = ("block_size", "batch_size", "grad_accum", "max_steps", "keep_last", "eval_batches")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.block_size < 2:
            raise TrainError("--block-size must be at least 2 (one token predicts the next)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise TrainError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.dtype not in ("bf16", "fp32"):
            raise TrainError(f"--dtype must be bf16 or fp32, got {self.dtype!r}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise TrainError("--lr must be > 0 and --min-lr-ratio in [0, 1]")


@dataclass
class TrainResult:
    step: int
    history: list[dict[str, Any]]  # one row per step run in this call (the CSV's columns)
    interrupted: bool
    checkpoint: Path | None
    final_dir: Path | None
    signal: int | None = None  # the signal that stopped the run early


# ---- data ------------------------------------------------------------------------------------------------
def collect_files(paths: Sequence[str]) -> list[Path]:
    """The .txt/.jsonl files named, or found under the folders named, in a fixed (sorted) order."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl") and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise TrainError(f"data path not found: {p}")
    if not files:
        raise TrainError(f"no .txt or .jsonl files in {', '.join(paths) or '(no --data given)'}")
    return files


def read_documents(files: Sequence[Path], text_field: str) -> Iterator[str]:
    for f in files:
        if f.suffix == ".jsonl":
            yield from _jsonl_documents(f, text_field)
        else:
            yield f.read_text(encoding="utf-8")


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise TrainError(
                    f"{path}:{lineno}: no string field {text_field!r} (choose it with --text-field)"
                )
            yield row[text_field]


@dataclass
class Dataset:
    """Token blocks (n, block_size), int32, for training and validation."""

    train: torch.Tensor
    val: torch.Tensor
    fingerprint: str
    num_tokens: int


def build_dataset(cfg: TrainConfig, tokenizer: Any, eos_id: int) -> Dataset:
    # int32 arrays per document, not one list of Python ints (28+ bytes each) for the whole corpus
    parts = [
        np.array([*tokenizer.encode(doc), eos_id], dtype=np.int32)
        for doc in read_documents(collect_files(cfg.data), cfg.text_field)
        if doc.strip()
    ]
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    n_blocks = len(ids) // cfg.block_size
    if n_blocks == 0:
        raise TrainError(
            f"the dataset has {len(ids)} tokens, fewer than one block of --block-size {cfg.block_size}: "
            "add text or lower --block-size"
        )
    tokens = torch.from_numpy(ids[: n_blocks * cfg.block_size].copy())
    blocks = tokens.view(n_blocks, cfg.block_size)
    n_val = math.ceil(n_blocks * cfg.val_fraction) if cfg.val_fraction > 0 else 0
    if n_val >= n_blocks:
        raise TrainError(
            f"--val-fraction {cfg.val_fraction} leaves no training blocks out of {n_blocks}: "
            "add text or lower it"
        )
    digest = hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:16]
    return Dataset(blocks[: n_blocks - n_val], blocks[n_blocks - n_val :], digest, len(ids))


class BlockSampler:
    """Hands out training block indices: epoch after epoch, each a permutation drawn from (seed, epoch)."""

    def __init__(self, num_blocks: int, seed: int) -> None:
        self.num_blocks, self.seed = num_blocks, seed
        self.epoch, self.pos = 0, 0
        self.perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_blocks, generator=gen)

    def take(self, n: int) -> torch.Tensor:
        out = []
        while n > 0:
            if self.pos == self.num_blocks:
                self.epoch, self.pos = self.epoch + 1, 0
                self.perm = self._permutation(self.epoch)
            k = min(n, self.num_blocks - self.pos)
            out.append(self.perm[self.pos : self.pos + k])
            self.pos, n = self.pos + k, n - k
        return torch.cat(out)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "perm": self.perm.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["perm"]) != self.num_blocks:
            raise TrainError("the checkpoint's data order does not match this dataset's number of blocks")
        self.epoch, self.pos, self.perm = int(state["epoch"]), int(state["pos"]), state["perm"].clone()


# ---- model, tokenizer, optimizer ---------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name} was requested but CUDA is not available")
    if dev.type == "cuda":  # TF32 matmuls for the fp32 path: ~10 bits of mantissa is plenty for training
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if dev.type not in ("cpu", "cuda"):
        raise TrainError(f"unsupported --device {name!r}: use auto, cpu, cuda or cuda:N")
    return dev


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.dtype == "fp32":
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        print("warning: this GPU has no bfloat16; training in float32", file=sys.stderr)
        return None
    return torch.bfloat16


def _default_gguf() -> Path:
    from model.defaults import require_default_model

    try:
        return require_default_model()
    except FileNotFoundError as e:
        raise TrainError(str(e)) from None


def load_tokenizer(cfg: TrainConfig) -> Any:
    from model.tokenizer import Tokenizer

    source: Path | None = None
    if cfg.tokenizer not in (None, "default"):
        source = Path(cfg.tokenizer)
    elif cfg.tokenizer is None and cfg.init not in ("scratch", "default"):
        init = Path(cfg.init)
        if init.suffix == ".gguf" or (init / "tokenizer.json").is_file():
            source = init
    try:
        return Tokenizer.from_file(source or _default_gguf())
    except (OSError, ValueError) as e:
        raise TrainError(f"cannot load the tokenizer: {e}") from None


def scratch_config(path: str | None) -> SmolLM2Config:
    if path is None:
        return SmolLM2Config()
    try:
        return SmolLM2Config.from_hf_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise TrainError(f"cannot read model config {path}: {e}") from None


def build_model(cfg: TrainConfig, device: torch.device) -> SmolLM2ForCausalLM:
    """A trainable float32 model: freshly initialized (the spec's init range) or loaded from a source."""
    if cfg.init == "scratch":
        with device:
            return SmolLM2ForCausalLM(scratch_config(cfg.config)).train()
    from model.weights import load_model

    source = None if cfg.init == "default" else cfg.init
    try:
        return load_model(source, dtype=torch.float32, device=device).train()
    except (OSError, ValueError) as e:
        raise TrainError(f"cannot load --init {cfg.init}: {e}") from None


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # Norm weights (1-D) are not decayed: shrinking them toward 0 only fights the normalization.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda" or None
    )


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---- RNG state as tensors and primitives (so torch.load(weights_only=True) reads it) ------------------------
def capture_rng() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }  # fmt: skip


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- checkpoints -------------------------------------------------------------------------------------------
def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_folder(final: Path, write: Callable[[Path], object]) -> Path:
    """Run write(tmp) into a temporary sibling folder, then rename it to `final` (replacing it)."""
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    _fsync_tree(tmp)
    if final.exists():  # a rename cannot replace a non-empty folder: move the old one aside first
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def save_export(model: SmolLM2ForCausalLM, tokenizer: Any, folder: Path) -> Path:
    from model.weights import save_hf_folder

    return atomic_folder(folder, lambda tmp: save_hf_folder(model, tmp, tokenizer))


def save_checkpoint(
    out_dir: Path, model: SmolLM2ForCausalLM, tokenizer: Any, state: dict[str, Any], keep: int
) -> Path:
    """step_N/ = an HF folder + trainer_state.pt; then `latest` points at it; then old ones are pruned."""
    from model.weights import save_hf_folder

    def write(tmp: Path) -> None:
        save_hf_folder(model, tmp, tokenizer)
        torch.save(state, tmp / STATE_FILE)

    root = out_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    folder = atomic_folder(root / f"step_{state['step']:08d}", write)
    atomic_write_text(out_dir / LATEST, f"checkpoints/{folder.name}\n")
    _prune(root, keep, keep_also=folder)
    return folder


def _checkpoint_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def _prune(root: Path, keep: int, keep_also: Path) -> None:
    for old in _checkpoint_folders(root)[:-keep]:
        if old != keep_also:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = out_dir / LATEST
    if not pointer.is_file():
        return None
    folder = out_dir / pointer.read_text().strip()
    if not folder.is_dir():
        raise TrainError(
            f"{pointer} points at {folder}, which does not exist; pass --resume FOLDER or --fresh"
        )
    return folder


def load_checkpoint(folder: Path, device: torch.device) -> tuple[SmolLM2ForCausalLM, dict[str, Any]]:
    """The model and trainer state of a checkpoint folder, or a TrainError saying what is wrong with it."""
    from model.weights import model_from_state_dict, read_hf_folder

    hint = "delete it (and fix out_dir/latest) or pass --resume with an older checkpoint"
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainError(f"{folder} is not a training checkpoint (no {STATE_FILE})") from None
    except Exception as e:  # torch raises several types (pickle, zip, runtime errors) on damaged files
        raise TrainError(f"checkpoint {folder} is corrupt: cannot read {STATE_FILE} ({e}); {hint}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"checkpoint {folder} has an unknown format; {hint}")
    try:
        config, tensors = read_hf_folder(folder)
        model = model_from_state_dict(config, tensors, torch.float32, device)
    except Exception as e:  # safetensors raises its own error types on damaged files
        raise TrainError(f"checkpoint {folder} is corrupt: cannot read its weights ({e}); {hint}") from None
    return model.train(), state


def _check_resumable(cfg: TrainConfig, state: dict[str, Any], data: Dataset, folder: Path) -> None:
    saved = state["train_config"]
    changed = [
        f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}"
        for k in RESUME_CRITICAL
        if saved.get(k) != getattr(cfg, k)
    ]
    if changed:
        raise TrainError(
            f"cannot resume from {folder}: these options changed ({'; '.join(changed)}); use --fresh"
        )
    if state["data_fingerprint"] != data.fingerprint:
        raise TrainError(
            f"cannot resume from {folder}: the training data (or tokenizer) changed since it was saved; "
            "use the same files, or --fresh to start over"
        )


# ---- logging -----------------------------------------------------------------------------------------------
class CsvLog:
    """out_dir/log.csv; on resume, rows logged after the checkpoint (then lost) are dropped first."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        rows: list[dict[str, str]] = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, CSV_FIELDS).writerow({k: row.get(k, "") for k in CSV_FIELDS})


def _fmt_time(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def progress_line(step: int, total: int, loss: float, lr: float, tok_s: float, step_s: float) -> str:
    width = 20
    done = int(width * step / total)
    bar = "#" * done + "." * (width - done)
    eta = _fmt_time((total - step) * step_s)
    return f"[{bar}] step {step}/{total} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | ETA {eta}"


# ---- the loop ----------------------------------------------------------------------------------------------
class _StopFlag:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step (a second one kills)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        # os.write, not print: the signal may land inside a print to stderr, which is not reentrant
        message = f"\n{signal.Signals(signum).name}: saving a checkpoint after this step ...\n"
        os.write(sys.stderr.fileno(), message.encode())

    @contextmanager
    def installed(self) -> Iterator[_StopFlag]:
        if threading.current_thread() is threading.main_thread():  # signal() works only there
            for sig in (signal.SIGINT.value, signal.SIGTERM.value):
                self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


@dataclass
class _Run:
    """Everything the loop mutates, so helpers take one argument instead of eight."""

    cfg: TrainConfig
    out_dir: Path
    device: torch.device
    amp: torch.dtype | None
    model: SmolLM2ForCausalLM
    tokenizer: Any
    data: Dataset
    sampler: BlockSampler
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    tokens_seen: int = 0

    def autocast(self) -> AbstractContextManager[Any]:
        return torch.autocast(
            self.device.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None
        )

    def trainer_state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.sampler.state_dict(),
            "data_fingerprint": self.data.fingerprint,
            "rng": capture_rng(),
            "train_config": dataclasses.asdict(self.cfg),
        }

    def checkpoint(self) -> Path:
        return save_checkpoint(
            self.out_dir, self.model, self.tokenizer, self.trainer_state(), self.cfg.keep_last
        )


def train_step(run: _Run) -> tuple[float, float]:
    """One optimizer step over grad_accum micro-batches; returns the mean loss and the lr it used."""
    cfg, total = run.cfg, 0.0
    for _ in range(cfg.grad_accum):
        batch = run.data.train[run.sampler.take(cfg.batch_size)].long().to(run.device, non_blocking=True)
        with run.autocast():
            loss = run.model(batch, labels=batch).loss / cfg.grad_accum
        loss.backward()
        total += float(loss.detach())
    if cfg.grad_clip > 0:
        nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.step += 1
    run.tokens_seen += cfg.grad_accum * cfg.batch_size * cfg.block_size
    return total, lr


@torch.no_grad()
def evaluate(run: _Run) -> float | None:
    """Mean loss over the first eval_batches validation batches (always the same ones)."""
    val = run.data.val
    if len(val) == 0:
        return None
    run.model.eval()
    losses = []
    for start in range(0, min(len(val), run.cfg.eval_batches * run.cfg.batch_size), run.cfg.batch_size):
        batch = val[start : start + run.cfg.batch_size].long().to(run.device)
        with run.autocast():
            losses.append(float(run.model(batch, labels=batch).loss))
    run.model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def sample(run: _Run) -> list[str]:
    """Generations from the fixed prompts; a private generator leaves the training RNG streams untouched."""
    gen = torch.Generator(run.device).manual_seed(run.cfg.seed)
    run.model.eval()
    texts = []
    for prompt in run.cfg.sample_prompts:
        ids = torch.tensor([run.tokenizer.encode(prompt) or [run.tokenizer.eos_token_id]], device=run.device)
        with run.autocast():
            out = run.model.generate(ids, run.cfg.sample_tokens, 0.8, 50, run.tokenizer.eos_token_id, gen)
        texts.append(prompt + run.tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True))
    run.model.train()
    return texts


def _log_samples(run: _Run) -> None:
    with open(run.out_dir / "samples.txt", "a", encoding="utf-8") as fh:
        for text in sample(run):
            line = f"step {run.step} | {text!r}"
            print(line, file=sys.stderr)
            fh.write(line + "\n")


def _every(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


def setup(cfg: TrainConfig) -> tuple[_Run, int | None]:
    """Build (or restore) everything the loop needs; returns the run and the step resumed from, if any."""
    cfg.validate()
    collect_files(cfg.data)  # fail on a wrong path before loading a model
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    resume_from = _resume_folder(cfg, out_dir)
    seed_everything(cfg.seed)
    if resume_from is not None:
        model, state = load_checkpoint(resume_from, device)
        tokenizer = load_tokenizer(dataclasses.replace(cfg, tokenizer=cfg.tokenizer or str(resume_from)))
    else:
        model, state, tokenizer = build_model(cfg, device), None, load_tokenizer(cfg)
    _check_model_fits(cfg, model, tokenizer)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    if eos is None:
        raise TrainError("the tokenizer has no EOS token to put between documents")
    data = build_dataset(cfg, tokenizer, eos)
    optimizer = make_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    )
    run = _Run(cfg, out_dir, device, autocast_dtype(cfg, device), model, tokenizer, data,
               BlockSampler(len(data.train), cfg.seed), optimizer, scheduler)  # fmt: skip
    if state is None:
        return run, None
    assert resume_from is not None
    _check_resumable(cfg, state, data, resume_from)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    run.sampler.load_state_dict(state["data"])
    run.step, run.tokens_seen = int(state["step"]), int(state["tokens_seen"])
    restore_rng(state["rng"])
    return run, run.step


def _resume_folder(cfg: TrainConfig, out_dir: Path) -> Path | None:
    for stale in (out_dir / "checkpoints").glob(".tmp-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        return latest_checkpoint(out_dir)
    folder = Path(cfg.resume)
    if (folder / LATEST).is_file():  # an out_dir given: its latest checkpoint
        return latest_checkpoint(folder)
    if not folder.is_dir():
        raise TrainError(f"--resume {folder}: no such checkpoint folder")
    return folder


def _check_model_fits(cfg: TrainConfig, model: SmolLM2ForCausalLM, tokenizer: Any) -> None:
    mc = model.config
    if cfg.block_size > mc.max_position_embeddings:
        raise TrainError(
            f"--block-size {cfg.block_size} is larger than the model's max_position_embeddings "
            f"({mc.max_position_embeddings})"
        )
    if tokenizer.vocab_size > mc.vocab_size:
        raise TrainError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {mc.vocab_size}"
        )


class _Progress:
    """Progress lines on stderr; tokens/s and ETA count time spent in training steps only."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.total, self.every = cfg.max_steps, cfg.log_every
        self.tokens_per_step = cfg.grad_accum * cfg.batch_size * cfg.block_size
        self.window_s, self.window_n = 0.0, 0

    def add(self, step_s: float) -> None:
        self.window_s, self.window_n = self.window_s + step_s, self.window_n + 1

    def report(self, row: dict[str, Any]) -> None:
        if not (_every(row["step"], self.every) or row["step"] == self.total) or not self.window_n:
            return
        mean_s = self.window_s / self.window_n
        line = progress_line(
            row["step"], self.total, row["loss"], row["lr"], self.tokens_per_step / mean_s, mean_s
        )
        val = row.get("val_loss")
        print(line + (f" | val {val:.4f}" if isinstance(val, float) else ""), file=sys.stderr)
        self.window_s, self.window_n = 0.0, 0


def _timed_step(run: _Run, progress: _Progress, t_start: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    loss, lr = train_step(run)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    step_s = time.perf_counter() - t0
    progress.add(step_s)
    if not math.isfinite(loss):
        raise TrainError(f"the loss became {loss} at step {run.step}; lower --lr or check the data")
    return {"step": run.step, "loss": loss, "lr": lr, "tokens_per_s": progress.tokens_per_step / step_s,
            "elapsed_s": round(time.perf_counter() - t_start, 3)}  # fmt: skip


def _periodic(run: _Run, stopping: bool) -> Path | None:
    """Samples, checkpoint and export due after this step; returns the checkpoint written, if any."""
    cfg, step = run.cfg, run.step
    if _every(step, cfg.sample_every):
        _log_samples(run)
    checkpoint = run.checkpoint() if _every(step, cfg.save_every) or stopping else None
    if _every(step, cfg.export_every):
        save_export(run.model, run.tokenizer, run.out_dir / "exports" / f"step_{step:08d}")
    return checkpoint


def train(cfg: TrainConfig, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train until max_steps or a signal; `on_step(step, loss)` is called after every step (tests, hooks)."""
    run, resumed = setup(cfg)
    csv_log = CsvLog(run.out_dir / "log.csv", resumed)
    if resumed is None:
        (run.out_dir / "samples.txt").unlink(missing_ok=True)
    _announce(run, resumed)
    history: list[dict[str, Any]] = []
    checkpoint: Path | None = None
    stop, progress, t_start = _StopFlag(), _Progress(cfg), time.perf_counter()
    with stop.installed():
        while run.step < cfg.max_steps and stop.signum is None:
            row = _timed_step(run, progress, t_start)
            if _every(run.step, cfg.eval_every) or run.step == cfg.max_steps:
                row["val_loss"] = evaluate(run) if len(run.data.val) else ""
            progress.report(row)
            csv_log.write(row)
            history.append(row)
            if on_step is not None:
                on_step(run.step, row["loss"])
            checkpoint = _periodic(run, stop.signum is not None) or checkpoint
    interrupted = stop.signum is not None and run.step < cfg.max_steps
    final_dir = None
    if not interrupted:
        if checkpoint is None or checkpoint.name != f"step_{run.step:08d}":
            checkpoint = run.checkpoint()
        final_dir = save_export(run.model, run.tokenizer, run.out_dir / "final")
    return TrainResult(run.step, history, interrupted, checkpoint, final_dir, stop.signum)


def _announce(run: _Run, resumed: int | None) -> None:
    n_params = sum(p.numel() for p in run.model.parameters())
    where = f"resumed at step {resumed}" if resumed is not None else f"init {run.cfg.init}"
    print(
        f"model {n_params / 1e6:.1f}M params ({where}) | {run.data.num_tokens:,} tokens: "
        f"{len(run.data.train)} train + {len(run.data.val)} val blocks of {run.cfg.block_size} | "
        f"device {run.device}, {'bf16 autocast' if run.amp else 'fp32'}",
        file=sys.stderr,
    )


# ---- command line ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="smollm2-train", description=__doc__.split("\n\n")[0],
                                argument_default=argparse.SUPPRESS)  # fmt: skip
    p.add_argument("--data", nargs="+", help="text (.txt) / JSONL (.jsonl) files or folders of them")
    p.add_argument("--out-dir", help=f"checkpoints, logs and the final model (default {d.out_dir})")
    p.add_argument("--init", help="scratch, default (the default GGUF) or a .gguf / HF folder / checkpoint")
    p.add_argument(
        "--config", help="model config JSON for --init scratch (default: the spec's SmolLM2Config)"
    )
    p.add_argument("--tokenizer", help="a .gguf, folder or tokenizer.json (default: the init model's)")
    p.add_argument("--text-field", help=f"JSONL field holding the text (default {d.text_field})")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help=f"bf16 = bfloat16 autocast (default {d.dtype})")
    p.add_argument("--device", help=f"auto, cpu, cuda or cuda:N (default {d.device})")
    p.add_argument("--sample-prompt", dest="sample_prompts", action="append", help="repeatable")
    for name in ("block_size", "batch_size", "grad_accum", "max_steps", "warmup_steps", "seed", "eval_every",
                 "eval_batches", "save_every", "keep_last", "export_every", "sample_every", "sample_tokens",
                 "log_every"):  # fmt: skip
        p.add_argument("--" + name.replace("_", "-"), type=int, help=f"default {getattr(d, name)}")
    for name in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip", "val_fraction"):
        p.add_argument("--" + name.replace("_", "-"), type=float, help=f"default {getattr(d, name)}")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--resume", nargs="?", const="auto", help="a checkpoint folder (default: out_dir/latest)"
    )
    group.add_argument("--fresh", action="store_true", help="ignore (and delete) out_dir's checkpoints")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Options given override the defaults, or, when resuming, the options saved in the checkpoint."""
    given = vars(args)
    fresh = given.pop("fresh", False)
    cfg = TrainConfig(
        **{k: v for k, v in given.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    )
    out_dir = Path(cfg.out_dir)
    if fresh:
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
        (out_dir / LATEST).unlink(missing_ok=True)
        cfg.resume = "never"
        return cfg
    folder = _resume_folder(cfg, out_dir)
    if folder is None:
        if "resume" in given:
            raise TrainError(f"--resume: {out_dir / LATEST} does not exist")
        return cfg
    try:
        saved = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)["train_config"]
    except Exception:
        return cfg  # load_checkpoint() reports what is wrong with it
    merged = {**saved, **{k: v for k, v in given.items() if k in saved}, "resume": str(folder)}
    return TrainConfig(**merged)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        if not cfg.data:
            raise TrainError("--data is required (text or JSONL files, or folders of them)")
        result = train(cfg)
    except TrainError as e:
        print(f"smollm2-train: error: {e}", file=sys.stderr)
        return 2
    if result.interrupted:
        print(f"stopped at step {result.step}; checkpoint {result.checkpoint}. Run the same command to resume.",
              file=sys.stderr)  # fmt: skip
        return 128 + (result.signal or signal.SIGINT)
    print(f"done: step {result.step}; model folder {result.final_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
