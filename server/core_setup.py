"""Building the engine core from `Settings`, in whichever process runs it (the engine's child process,
or the server's engine thread with `--engine-process false`).

The spawned engine process imports this module (and, through load_core, torch and the model); the
server process imports it too but needs none of that, so the heavy imports are inside the functions,
and nothing here imports the HTTP stack.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import TYPE_CHECKING, Any

from server.engine.cpu_share import CPUShare
from server.settings import Settings

if TYPE_CHECKING:
    from model.tokenizer import Tokenizer
    from server.engine.core import EngineCore
    from server.engine.structured import StructuredOutputs

log = logging.getLogger("server")
DEFAULT_MAX_MODEL_LEN = 8192


def resolve_device_dtype(settings: Settings) -> tuple[str, str]:
    import torch

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu" and torch.version.cuda is not None:  # a CUDA build of torch, no usable GPU
            log.warning(
                "no CUDA device available (torch %s, CUDA %s): falling back to CPU",
                torch.__version__,
                torch.version.cuda,
            )
    # bf16 on both: on this project's CPUs bf16 GEMMs run 3-4x faster than fp32 (bench notes).
    dtype = "bfloat16" if settings.dtype == "auto" else settings.dtype
    return device, dtype


def make_core(
    model: Any, eos_token_id: int | None, settings: Settings, tokenizer: Tokenizer | None = None
) -> EngineCore:
    """Size the KV cache (kv_cache_blocks); build runner + scheduler + EngineCore. With `tokenizer`, the
    runner can constrain outputs (structured output needs the vocabulary's text)."""
    from server.engine.core import EngineConfig, EngineCore
    from server.engine.runner import ModelRunner
    from server.engine.scheduler import Scheduler, SchedulerConfig
    from server.engine.spec_decode import SpecConfig

    max_model_len = resolve_max_model_len(settings, model.config.max_position_embeddings)
    rope = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rope is not None:  # the table the served context reads, not the model's whole max_position_embeddings
        rope.resize(max_model_len)
    eos = eos_token_id if eos_token_id is not None else model.config.eos_token_id
    num_blocks, why = kv_cache_blocks(model, settings, max_model_len)
    scheduler = SchedulerConfig(
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        idle_batched_tokens=settings.max_num_batched_tokens_idle,
        max_model_len=max_model_len,
        block_size=settings.block_size,
        num_blocks=num_blocks,
        enable_prefix_caching=settings.enable_prefix_caching,
        eos_token_id=eos,
        max_seqs_per_request=settings.seqs_per_request,
        speculative=SpecConfig(
            settings.speculative_ngram,
            settings.speculative_ngram_min,
            settings.speculative_ngram_max,
            settings.speculative_max_num_seqs,
        ),
    )
    try:
        scheduler.validate()
    except ValueError as e:
        raise ValueError(f"{e}: raise --kv-cache-memory (now {why}) or lower --max-model-len") from e
    runner = ModelRunner(
        model, num_blocks, settings.block_size, eos, cuda_graphs=settings.cuda_graphs,
        max_num_seqs=settings.max_num_seqs, max_model_len=max_model_len, capture_graphs_now=True,
        structured=None if tokenizer is None else functools.partial(_structured, tokenizer, model.config.vocab_size),
    )  # fmt: skip
    config = EngineConfig(scheduler, settings.max_waiting, kv_cache_bytes=runner.kv_cache_bytes)
    core = EngineCore(runner, Scheduler(scheduler), config)
    log.info(
        "KV cache: %d blocks x %d tokens = %d tokens, %.0f MiB%s (%s); max_model_len %d, max_num_seqs %d",
        num_blocks, settings.block_size, num_blocks * settings.block_size, runner.kv_cache_bytes / 2**20,
        " reserved, taken as blocks are first written" if model.device.type == "cpu" else "", why,
        max_model_len, settings.max_num_seqs,
    )  # fmt: skip
    return core


def resolve_max_model_len(settings: Settings, max_position_embeddings: int) -> int:
    """--max-model-len, or min(the model's context, DEFAULT_MAX_MODEL_LEN); a ValueError past the model's
    context (as vLLM refuses it: positions the model was never trained on)."""
    if settings.max_model_len is None:
        return min(max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
    if settings.max_model_len > max_position_embeddings:
        raise ValueError(
            f"--max-model-len {settings.max_model_len} is larger than the model's context "
            f"(max_position_embeddings {max_position_embeddings}): allowed 2 to {max_position_embeddings}"
        )
    return settings.max_model_len


# Tokens per running sequence the default KV cache holds room for: a chat turn's prompt and answer. A
# busier mix preempts (and later recomputes) the newest sequences instead of failing; a larger pool is
# one --kv-cache-memory away. On the CPU the pool's pages take memory only once written
# (model.attention.allocate_kv_cache), so an idle server does not pay for this room.
KV_TOKENS_PER_SEQ = 256


def kv_cache_blocks(model: Any, settings: Settings, max_model_len: int) -> tuple[int, str]:
    """KV blocks for --kv-cache-memory, or by default for max_num_seqs sequences of KV_TOKENS_PER_SEQ
    tokens (at least one sequence of max_model_len); and how that was decided, for the log."""
    from server.engine.runner import num_blocks_for_memory

    memory = settings.kv_cache_memory
    if memory is not None:
        return num_blocks_for_memory(
            model, memory, settings.block_size, model.dtype
        ), f"--kv-cache-memory {memory}"
    tokens = max(max_model_len, settings.max_num_seqs * KV_TOKENS_PER_SEQ)
    why = f"default: {settings.max_num_seqs} sequences x {KV_TOKENS_PER_SEQ} tokens, at least max_model_len"
    return -(-tokens // settings.block_size), why


def _structured(tokenizer: Tokenizer, vocab_size: int) -> StructuredOutputs:
    from server.engine.structured import StructuredOutputs  # xgrammar: only once a request needs it

    return StructuredOutputs(tokenizer, vocab_size)


def model_source(settings: Settings) -> str:
    from model.defaults import require_default_model

    return settings.model or str(require_default_model())


def load_core(settings: Settings) -> EngineCore:
    """Load the model named by `settings` and build its EngineCore (in whichever process runs the steps)."""
    from model.prepared import load_prepared
    from model.quant import ALL_ROWS
    from model.tokenizer import Tokenizer

    source = model_source(settings)
    # before the model, which takes seconds: a source without a readable tokenizer fails at once
    tokenizer = Tokenizer.from_file(source)
    device, dtype = resolve_device_dtype(settings)
    if device == "cpu":
        import torch

        from model.threads import cpu_limits_text, usable_cpus

        threads = settings.torch_threads or default_torch_threads(settings)
        torch.set_num_threads(threads)
        cpus = settings.threads or usable_cpus()
        log.info(
            "CPU: %d thread(s) for GEMMs and attention%s, %d for small element-wise ops (%s)",
            cpus, "" if settings.threads is None else " (--threads)", threads, cpu_limits_text(),
        )  # fmt: skip
    model = load_prepared(
        source, dtype, device, settings.int4_small_batch, settings.int8_lm_head, settings.prepared_cache,
        batch_invariant=settings.batch_invariant,
    )  # fmt: skip
    if device == "cpu":
        model.use_compute_threads(cpus)
    if settings.batch_invariant:
        log.info("batch-invariant: bf16 tile GEMM for every linear, the paged attention kernel for every row")
    cfg = model.config
    log.info(
        "loaded %s: %d layers, hidden %d, vocab %d, context %d, %s on %s",
        source, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, cfg.max_position_embeddings, dtype, device,
    )  # fmt: skip
    if model.int4_active:
        log.info(
            "int4 weights for %s (reconstruction error %.4f)",
            "every step" if model.int4_rows >= ALL_ROWS else f"steps of <= {model.int4_rows} tokens",
            model.int4_error,
        )
    elif settings.int4_small_batch != "off" and model.int4_error is not None:
        log.info("int4 weights off: they would change the model (error %.4f > lossless)", model.int4_error)
    if model.int8_head_active:
        head = model.lm_head_linear
        log.info(
            "int8 LM head for steps sampling <= %d tokens (reconstruction error %.4f)",
            head.int8_max_rows if head is not None else 0,
            model.int8_head_error,
        )
    elif settings.int8_lm_head != "off" and model.int8_head_error is not None:
        log.info("int8 LM head off: it would change the model (error %.4f > lossless)", model.int8_head_error)
    core = make_core(model, tokenizer.eos_token_id, settings, tokenizer)
    if device == "cpu":
        core.compute_threads = cpus
    if device == "cpu" and cpus > 1:
        core.cpu_share = CPUShare(functools.partial(_set_threads, model, threads), cpus)
    if device == "cpu":
        _check_memory_limit(core.config.kv_cache_bytes)
    return core


MEMORY_HEADROOM = 300 * 2**20  # a long prompt's step (activations, logits, sampling) above the idle tree


def _check_memory_limit(kv_cache_bytes: int) -> None:
    """Under a cgroup memory limit (a container's), warn at start when the server and engine as they are
    now, plus the KV cache once full, plus a long prompt's step would not fit: the kernel would kill the
    engine mid-request (the KV cache's pages are only taken as they are first written)."""
    from model.threads import cgroup_memory

    mem = cgroup_memory()
    if mem is None:
        return
    limit, _ = mem
    from server.engine.core import trim_heap

    trim_heap()  # loading leaves freed temporaries in the heap: what stays is what counts
    resident = sum(_rss(pid) for pid in (os.getpid(), os.getppid()))
    need = resident + kv_cache_bytes + MEMORY_HEADROOM
    mib = 2**20
    if need > limit:
        log.warning(
            "memory: the cgroup's limit is %d MiB, and the server and engine hold %d MiB now; the KV cache "
            "takes up to %d MiB more once full and a long prompt's step ~%d MiB: under load the kernel may "
            "kill the engine. Lower --kv-cache-memory or raise the limit",
            limit // mib, resident // mib, kv_cache_bytes // mib, MEMORY_HEADROOM // mib,
        )  # fmt: skip
    else:
        log.info("memory: cgroup limit %d MiB, %d MiB needed at most", limit // mib, need // mib)


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _set_threads(model: Any, small_ops: int, threads: int) -> None:
    """The model's compute threads, and the small ops' (on the calling thread: the one that steps) at most as
    many."""
    import torch

    model.use_compute_threads(threads)
    torch.set_num_threads(min(small_ops, threads))


def default_torch_threads(settings: Settings) -> int:
    """All compute threads but one for ATen's element-wise loops (our GEMMs switch to all of them around
    each call): on 2 cores, two OpenMP threads on each of a step's ~3,000 small ops cost more than they
    gave (bench/NOTES.md)."""
    from model.threads import usable_cpus

    return max(1, (settings.threads or usable_cpus()) - 1)
