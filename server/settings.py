"""Server settings: one dataclass, filled from CLI flags and ``SMOLLM2_*`` environment variables.

Precedence: a flag given on the command line wins over the environment, which wins over the default.
Each field's ``help`` text is what ``python -m server --help`` prints.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "SMOLLM2_"
# A block larger than this makes one block gigabytes of KV cache and serves requests one at a time; vLLM
# stops at 128 on most backends. Any size up to it works here (odd ones included).
MAX_BLOCK_SIZE = 256
MIN_MODEL_LEN = 2
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2}
_UNITS |= {"g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_bytes(text: str | int) -> int:
    """``"1GiB"`` -> 1073741824, ``"512MB"`` -> 512000000, ``"4096"`` -> 4096."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 1GiB, 512MiB, 4096)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true/false)")


def parse_list(text: str | list[str]) -> list[str]:
    if isinstance(text, list):
        return text
    return [item.strip() for item in text.split(",") if item.strip()]


def _opt(default: Any, help: str, parse: Any = None, secret: bool = False) -> Any:
    meta = {"help": help, "parse": parse, "secret": secret}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Settings:
    model: str | None = _opt(
        None,
        "model to serve: a .gguf file, an HF folder or a training checkpoint (default: the default GGUF)",
    )
    served_model_name: str = _opt(DEFAULT_MODEL_NAME, "model name clients must send in the `model` field")
    host: str = _opt("127.0.0.1", "address to listen on")
    port: int = _opt(8000, "port to listen on", int)
    dtype: str = _opt("auto", "weights/activations dtype: auto, bfloat16, float16 or float32")
    device: str = _opt("auto", "torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
    max_num_seqs: int = _opt(64, "most sequences running in one engine step", int)
    max_num_batched_tokens: int = _opt(
        512,
        "prompt-token budget of one engine step (each decoding sequence adds its one row on top); longer "
        "prompts are chunked across steps. Smaller steps let the first prompts of a burst start streaming "
        "sooner and shorten the stalls of running streams; larger ones batch more rows per GEMM (512 gave "
        "6-8 percent more tokens/s than 256 at 32-64 streams)",
        int,
    )
    max_num_batched_tokens_idle: int = _opt(
        2048,
        "token budget of a step while no sequence is generating (no stream waits on it): a long prompt "
        "arriving alone is prefilled in fewer, larger chunks; at most --max-num-batched-tokens applies "
        "otherwise (a value below it: always --max-num-batched-tokens)",
        int,
    )
    kv_cache_memory: int | None = _opt(
        None,
        "memory for the paged KV cache, e.g. 1GiB, 512MiB or bytes; default: room for --max-num-seqs "
        "sequences of 256 tokens (at least one of --max-model-len), logged at start-up",
        parse_bytes,
    )
    block_size: int = _opt(16, f"tokens per KV cache block (1 to {MAX_BLOCK_SIZE})", int)
    max_model_len: int | None = _opt(
        None, "context length (prompt + output); default min(model context, 8192)", int
    )
    max_waiting: int = _opt(
        256,
        "waiting-queue limit (at least 1): sequences waiting beyond the running batch's free places; "
        "requests beyond it get 429",
        int,
    )
    enable_prefix_caching: bool = _opt(
        True, "reuse KV blocks of shared prompt prefixes (true/false)", parse_bool
    )
    engine_process: bool = _opt(
        True,
        "run the engine loop (model steps) in its own process, as vLLM does, so it does not share the "
        "GIL with HTTP and detokenization (false: a thread of the server process)",
        parse_bool,
    )
    threads: int | None = _opt(
        None,
        "CPU threads for the engine's GEMMs, attention and long prompts' element-wise ops (llama.cpp's "
        "--threads); default: the usable CPUs, the affinity mask capped by the cgroup's CPU quota "
        "(docker run --cpus, a Kubernetes CPU limit), rounded down",
        int,
    )
    torch_threads: int | None = _opt(
        None,
        "CPU threads for the engine's small element-wise ops; default: --threads less one, at least 1 (on "
        "2 cores, two threads on each small op cost more than they gave)",
        int,
    )
    int4_small_batch: str = _opt(
        "auto",
        "int4 copies of the layer weights for small steps on CPU in bfloat16 (up to 12 tokens with "
        "AVX512-VNNI; the README says which CPUs take how many) (a quarter of the bytes to stream per token): auto = only when lossless (weights already 4-bit groupwise, as "
        "in the Q4_1 GGUF), on = always (lossy for other weights), off",
    )
    int8_lm_head: str = _opt(
        "auto",
        "int8 copy of the LM head (blocks of 32, a scale each: GGUF's Q8_0) for steps that sample few "
        "tokens on CPU in bfloat16 (up to 12 with AVX512-VNNI; see the README) (about half the bytes of the largest matrix): auto = only when lossless "
        "(the head already 8-bit, as in the GGUF), on = always, off",
    )
    batch_invariant: bool = _opt(
        False,
        "batch-invariant serving: a greedy request gives the same tokens alone, in any batch and after a "
        "prefix-cache hit (one GEMM and one attention kernel for every batch shape, each summing a row in a "
        "fixed order; no int4/int8 copies). CPU with AVX512-BF16 and bfloat16 only; costs throughput "
        "(bench/NOTES.md)",
        parse_bool,
    )
    cuda_graphs: bool = _opt(
        True,
        "capture decode steps in CUDA graphs on a GPU (false = eager, like vLLM's --enforce-eager)",
        parse_bool,
    )
    speculative_ngram: int = _opt(
        0,
        "speculative decoding without a draft model: up to this many tokens per step guessed by n-gram "
        "lookup in the prompt and output (prompt lookup, as vLLM's ngram method) and verified in the same "
        "step; greedy requests only (their output is unchanged), helps on repetitive text (quoting, "
        "editing). 0: off",
        int,
    )
    speculative_ngram_min: int = _opt(2, "shortest n-gram looked up for --speculative-ngram", int)
    speculative_ngram_max: int = _opt(4, "longest n-gram looked up for --speculative-ngram", int)
    speculative_max_num_seqs: int = _opt(
        4,
        "draft only while at most this many sequences run (larger CPU steps are compute-bound, so a "
        "rejected draft costs about as much as a generated token)",
        int,
    )
    max_seqs_per_request: int | None = _opt(
        None,
        "most sequences (n x prompts) of one request running at once; the rest wait without blocking "
        "other requests. Default: half of --max-num-seqs",
        int,
    )
    max_prompts_per_request: int = _opt(2048, "most prompts in one /v1/completions request", int)
    max_stop_strings: int = _opt(64, "most stop strings in one request", int)
    max_stop_string_length: int = _opt(256, "longest stop string, in characters", int)
    max_logit_bias: int = _opt(1024, "most logit_bias entries in one request", int)
    max_stop_token_ids: int = _opt(1024, "most stop_token_ids in one request", int)
    max_logprob_entries: int = _opt(
        300_000,
        "most log-probability entries one request may produce: choices x tokens (output, and prompt "
        "with echo) x (top logprobs + 1)",
        int,
    )
    max_engine_restarts: int = _opt(
        3,
        "engine core failures tolerated within --engine-restart-window; one more and the server exits "
        "non-zero so that its supervisor (Docker, Kubernetes, systemd) restarts it",
        int,
    )
    engine_restart_window: float = _opt(600.0, "seconds over which engine failures are counted", float)
    step_timeout: float = _opt(
        120.0,
        "seconds a busy engine may take to finish one step before it is treated as hung: /health turns "
        "503 and the engine core is restarted (0: off)",
        float,
    )
    prepared_cache: bool = _opt(
        True,
        "keep the model prepared for serving on CPU in the cache folder, so later starts and engine "
        "restarts skip preparing it (true/false)",
        parse_bool,
    )
    api_key: str | None = _opt(None, "require `Authorization: Bearer <key>` on /v1 routes", secret=True)
    api_key_file: str | None = _opt(
        None, "read the API key from this file (first line), so it does not show in `ps` or the environment"
    )
    protect_all: bool = _opt(
        False,
        "require the API key on /tokenize, /detokenize, /metrics and /dashboard too (/health stays open)",
        parse_bool,
    )
    cors_origins: list[str] = _opt(
        [], "comma-separated origins allowed by CORS (empty: CORS off)", parse_list
    )
    max_body_bytes: int = _opt(
        1024**2, "largest request body accepted, e.g. 1MiB; larger gets 413", parse_bytes
    )
    max_preparing_bytes: int = _opt(
        16 * 1024**2,
        "request bodies, in bytes, read and being prepared (parsed, rendered, tokenized) at once before "
        "their requests reach the engine; a request past it gets 429 (a parsed body can take 30x its size)",
        parse_bytes,
    )
    max_connections: int = _opt(
        4096,
        "open HTTP connections held at once; past it a new one is answered 503 and closed (lowered to what "
        "the process's open-file limit allows)",
        int,
    )
    client_timeout: float = _opt(
        30.0,
        "seconds a client has to send a request's headers, then its body, and to take any of a response "
        "whose send buffer is full; past it 408 or a disconnect (0: wait for ever)",
        float,
    )
    log_level: str = _opt("info", "log level: debug, info, warning, error")
    log_format: str = _opt("text", "log lines as text or json (one object per line, access log included)")
    disable_access_log: bool = _opt(False, "do not log one line per HTTP request", parse_bool)
    stats_log_interval: float = _opt(
        10.0, "seconds between engine stats lines while the engine is busy (0: never)", float
    )
    shutdown_timeout: float = _opt(30.0, "seconds in-flight requests get to finish on SIGTERM", float)

    @property
    def seqs_per_request(self) -> int:
        return self.max_seqs_per_request or max(1, self.max_num_seqs // 2)

    def __repr__(self) -> str:  # never print the API key
        shown = {
            f.name: ("***" if f.metadata.get("secret") and getattr(self, f.name) else getattr(self, f.name))
            for f in fields(self)
        }
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    def __post_init__(self) -> None:
        checks = [
            (1 <= self.port <= 65535, f"port must be in [1, 65535], got {self.port}"),
            (self.threads is None or self.threads >= 1, f"threads must be at least 1, got {self.threads}"),
            (
                self.torch_threads is None or self.torch_threads >= 1,
                f"torch_threads must be at least 1, got {self.torch_threads}",
            ),
            (self.max_num_seqs >= 1, f"max_num_seqs must be at least 1, got {self.max_num_seqs}"),
            (self.speculative_ngram >= 0, f"speculative_ngram must be >= 0, got {self.speculative_ngram}"),
            (
                1 <= self.speculative_ngram_min <= self.speculative_ngram_max,
                "need 1 <= speculative_ngram_min <= speculative_ngram_max, got "
                f"{self.speculative_ngram_min} and {self.speculative_ngram_max}",
            ),
            (
                self.speculative_max_num_seqs >= 1,
                f"speculative_max_num_seqs must be at least 1, got {self.speculative_max_num_seqs}",
            ),
            (
                self.max_num_batched_tokens >= 1,
                f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}",
            ),
            (
                self.kv_cache_memory is None or self.kv_cache_memory > 0,
                f"kv_cache_memory must be positive, got {self.kv_cache_memory}",
            ),
            (
                1 <= self.block_size <= MAX_BLOCK_SIZE,
                f"block_size must be in [1, {MAX_BLOCK_SIZE}] tokens, got {self.block_size}",
            ),
            (
                self.max_model_len is None or self.max_model_len >= MIN_MODEL_LEN,
                f"max_model_len must be at least {MIN_MODEL_LEN} (a prompt token and a generated one), "
                f"got {self.max_model_len}",
            ),
            (self.max_waiting >= 1, f"max_waiting must be at least 1, got {self.max_waiting}"),
            (
                self.max_seqs_per_request is None or self.max_seqs_per_request >= 1,
                f"max_seqs_per_request must be at least 1, got {self.max_seqs_per_request}",
            ),
            (
                1 <= self.max_prompts_per_request <= 1_000_000,
                f"max_prompts_per_request must be in [1, 1000000], got {self.max_prompts_per_request}",
            ),
            (
                self.max_stop_strings >= 0,
                f"max_stop_strings must be non-negative, got {self.max_stop_strings}",
            ),
            (
                self.max_stop_string_length >= 1,
                f"max_stop_string_length must be at least 1, got {self.max_stop_string_length}",
            ),
            (self.max_logit_bias >= 0, f"max_logit_bias must be non-negative, got {self.max_logit_bias}"),
            (
                self.max_stop_token_ids >= 0,
                f"max_stop_token_ids must be non-negative, got {self.max_stop_token_ids}",
            ),
            (
                self.max_logprob_entries >= 1,
                f"max_logprob_entries must be at least 1, got {self.max_logprob_entries}",
            ),
            (
                self.max_engine_restarts >= 0,
                f"max_engine_restarts must be non-negative, got {self.max_engine_restarts}",
            ),
            (
                self.engine_restart_window > 0,
                f"engine_restart_window must be positive, got {self.engine_restart_window}",
            ),
            (self.step_timeout >= 0, f"step_timeout must be non-negative, got {self.step_timeout}"),
            (self.max_body_bytes >= 1, f"max_body_bytes must be positive, got {self.max_body_bytes}"),
            (
                self.max_preparing_bytes >= 1,
                f"max_preparing_bytes must be positive, got {self.max_preparing_bytes}",
            ),
            (self.max_connections >= 1, f"max_connections must be at least 1, got {self.max_connections}"),
            (self.client_timeout >= 0, f"client_timeout must be non-negative, got {self.client_timeout}"),
            (self.dtype in ("auto", "bfloat16", "float16", "float32"), f"unknown dtype {self.dtype!r}"),
            (
                not self.batch_invariant or self.dtype in ("auto", "bfloat16"),
                f"batch_invariant serves bfloat16 only, not dtype {self.dtype!r}",
            ),
            (
                self.int4_small_batch in ("auto", "on", "off"),
                f"int4_small_batch must be auto, on or off, got {self.int4_small_batch!r}",
            ),
            (
                self.int8_lm_head in ("auto", "on", "off"),
                f"int8_lm_head must be auto, on or off, got {self.int8_lm_head!r}",
            ),
        ]
        checks += [
            (
                self.log_level.lower() in LOG_LEVELS,
                f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}",
            ),
            (
                self.log_format in ("text", "json"),
                f"log_format must be text or json, got {self.log_format!r}",
            ),
            (self.stats_log_interval >= 0, f"stats_log_interval must be >= 0, got {self.stats_log_interval}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self._load_api_key()

    def _load_api_key(self) -> None:
        """An empty key is a mistake (an unset variable, an empty file), never a way to turn auth off."""
        if self.api_key_file is not None:
            try:
                text = Path(self.api_key_file).read_text().splitlines()
            except OSError as e:
                raise ValueError(f"cannot read api_key_file: {e}") from e
            key = text[0].strip() if text else ""
            if not key:
                raise ValueError(f"api_key_file {self.api_key_file} is empty")
            if self.api_key is not None and self.api_key != key:
                raise ValueError("give the API key once: api_key or api_key_file, not both")
            self.api_key = key
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty: give a key, or leave it unset to turn authentication off")

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
        """Parse flags (``argv``; None = sys.argv) over ``SMOLLM2_*`` variables (``env``; None = os.environ)."""
        env = os.environ if env is None else env
        args = build_parser().parse_args(argv)
        values: dict[str, Any] = {}
        origin: dict[str, str] = {}  # where each value came from, for the error messages
        for f in fields(cls):
            raw = getattr(args, f.name)
            where = "--" + f.name.replace("_", "-")
            if raw is None:
                raw = env.get(ENV_PREFIX + f.name.upper())
                where = ENV_PREFIX + f.name.upper()
            if raw is None:
                continue
            origin[f.name] = where
            parse = f.metadata.get("parse")
            try:
                values[f.name] = parse(raw) if parse else raw
            except ValueError as e:
                reason = f"not {_KINDS[parse]}" if parse in _KINDS else str(e)
                raise ValueError(f"{where} {raw!r}: {reason}") from None
        try:
            return cls(**values)
        except ValueError as e:
            # __post_init__ names the field; say where its value came from, the flag or the variable
            name = str(e).split(" ", 1)[0]
            raise ValueError(f"{origin[name]}: {e}" if name in origin else str(e)) from None


_KINDS: dict[Any, str] = {int: "an integer", float: "a number"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="OpenAI-compatible server for SmolLM2. Every flag can also be set as an environment "
        f"variable {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}PORT=9000); a flag wins over the environment.",
    )
    for f in fields(Settings):
        default = f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc,operator]
        shown = "unset" if default is None else default
        # a true/false flag alone means true (`--disable-access-log`), as in vLLM and llama-server
        bare: dict[str, Any] = (
            {"nargs": "?", "const": "true"} if f.metadata.get("parse") is parse_bool else {}
        )
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,  # None = not given, so the environment can fill it
            help=f"{f.metadata['help']} [env {ENV_PREFIX}{f.name.upper()}; default {shown}]",
            **bare,
        )
    return parser
