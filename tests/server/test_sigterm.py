"""SIGTERM for real: `python -m server` on a tiny model drains in-flight streams, then exits cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from model.tokenizer import Tokenizer
from tests.server.conftest import free_port
from tests.server.test_api import MODEL

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
MAX_TOKENS = 600  # long enough to be mid-stream when the signal lands


def tiny_model_folder(tokenizer: Tokenizer, folder: Path) -> Path:
    import torch

    from model.config import SmolLM2Config
    from model.modeling import SmolLM2ForCausalLM
    from model.weights import save_hf_folder

    torch.manual_seed(0)
    config = SmolLM2Config(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return save_hf_folder(SmolLM2ForCausalLM(config).eval(), folder, tokenizer)


def start_server(
    model: Path, port: int, new_session: bool = False, extra: tuple[str, ...] = ()
) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "server", "--model", str(model), "--port", str(port), "--dtype", "float32",
           "--kv-cache-memory", "8MiB", "--max-model-len", "1024", "--shutdown-timeout", "60", *extra]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=new_session,
    )
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, f"server exited: {proc.communicate()[0]}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not become healthy in 120 s"
        time.sleep(0.2)


@pytest.mark.parametrize("whole_group", [False, True], ids=["server", "process-group"])
def test_sigterm_drains_the_in_flight_stream_then_exits_zero(
    tokenizer: Tokenizer, tmp_path: Path, whole_group: bool
) -> None:
    """`kill` of the server, or `docker stop` / Ctrl-C, which signal the whole process group: the engine
    process must outlive the signal until the server has drained."""
    proc, port = start_tiny(tokenizer, tmp_path, new_session=whole_group)
    url = f"http://127.0.0.1:{port}/v1/completions"
    body = {"model": MODEL, "prompt": "Once", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    try:
        events: list[str] = []
        with httpx.stream("POST", url, json=body, timeout=60) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data: "))
            events.append(next(lines))
            if whole_group:
                os.killpg(proc.pid, signal.SIGTERM)
            else:
                proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)  # uvicorn notices the signal and closes its listener
            with pytest.raises(httpx.TransportError):  # no new request gets in during the drain
                httpx.post(url, json={**body, "stream": False, "max_tokens": 1}, timeout=5)
            events.extend(lines)
        assert proc.wait(timeout=60) == 0, proc.communicate()[0][-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    finishes = [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]]
    assert finishes == ["length"] and chunks[-1]["usage"]["completion_tokens"] == MAX_TOKENS
    assert sum(1 for chunk in chunks for _ in chunk["choices"]) <= MAX_TOKENS


def start_tiny(
    tokenizer: Tokenizer, tmp_path: Path, *extra: str, new_session: bool = False
) -> tuple[subprocess.Popen[str], int]:
    """`python -m server` on a tiny random model, healthy: (its process, its port)."""
    port = free_port()
    model = tiny_model_folder(tokenizer, tmp_path / "tiny")
    return start_server(model, port, new_session=new_session, extra=extra), port


def engine_pid(server_pid: int) -> int:
    """The engine process: the server's child started by multiprocessing's spawn (not its resource tracker)."""
    tasks = Path(f"/proc/{server_pid}/task").glob("*/children")  # children of every thread
    children = [pid for task in tasks for pid in task.read_text().split()]
    for pid in children:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in cmdline:
            return int(pid)
    raise AssertionError(f"no engine process among {children}")


def test_a_killed_engine_core_fails_its_stream_then_the_server_recovers(
    tokenizer: Tokenizer, tmp_path: Path
) -> None:
    proc, port = start_tiny(tokenizer, tmp_path)
    base = f"http://127.0.0.1:{port}"
    body = {"model": MODEL, "prompt": "Once", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
    try:
        first = engine_pid(proc.pid)
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data: "))
            next(lines)
            os.kill(first, signal.SIGKILL)
            events = list(lines)
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert "engine" in error["message"] and error["code"] >= 500
        deadline = time.monotonic() + 120
        while httpx.get(f"{base}/health", timeout=5).status_code != 200:  # 503 while the core restarts
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        assert engine_pid(proc.pid) != first
        r2 = httpx.post(f"{base}/v1/completions", json={**body, "stream": False, "max_tokens": 5}, timeout=60)
        assert r2.status_code == 200 and r2.json()["usage"]["completion_tokens"] == 5
        metrics = httpx.get(f"{base}/metrics", timeout=5).text
        assert "smollm2:engine_restarts_total" in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.mark.parametrize("signals", [1, 2], ids=["drain-times-out", "second-signal"])
def test_requests_still_running_when_the_drain_ends_get_an_error_ending(
    tokenizer: Tokenizer, tmp_path: Path, signals: int
) -> None:
    """Past --shutdown-timeout (or at a second signal) each request still running gets a 503 in OpenAI's
    shape (a stream its error event and [DONE]), not a cut connection or a plain-text 500; a stop forced
    by the second signal exits 128 + SIGINT."""
    proc, port = start_tiny(tokenizer, tmp_path, "--shutdown-timeout", "1", "--max-num-seqs", "1")
    url = f"http://127.0.0.1:{port}/v1/completions"
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 1000, "ignore_eos": True}

    def stream() -> list[str]:
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as r:
            return [line for line in r.iter_lines() if line.startswith("data: ")]

    stalled = socket.create_connection(("127.0.0.1", port))  # sends half its body, then nothing
    stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100\r\n\r\n{\"model\": ")  # fmt: skip
    try:
        with ThreadPoolExecutor(8) as pool:
            streams = [pool.submit(stream) for _ in range(6)]
            plain = [pool.submit(httpx.post, url, json=body, timeout=60) for _ in range(2)]
            time.sleep(1.0)  # one runs, the others wait their turn (--max-num-seqs 1)
            for _ in range(signals):
                proc.send_signal(signal.SIGINT)
                time.sleep(0.2)
            ended = [f.result(timeout=30) for f in streams]
            answers = [f.result(timeout=30) for f in plain]
        assert proc.wait(timeout=30) == (0 if signals == 1 else 128 + signal.SIGINT)
    finally:
        stalled.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.communicate()[0]  # the stalled upload was closed, not cancelled by uvicorn with a traceback
    assert "Traceback" not in log and "Cancel" not in log, log[-3000:]
    cut = [events for events in ended if '"service_unavailable"' in events[-2]]
    assert cut and all(events[-1] == "data: [DONE]" for events in ended)
    for r in answers:
        assert r.status_code in (200, 503), r.text
        if r.status_code == 503:
            assert r.json()["error"]["type"] == "service_unavailable"


def test_an_engine_that_dies_during_the_drain_is_not_restarted_and_the_exit_says_so(
    tokenizer: Tokenizer, tmp_path: Path
) -> None:
    proc, port = start_tiny(tokenizer, tmp_path)
    url = f"http://127.0.0.1:{port}/v1/completions"
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    try:
        engine = engine_pid(proc.pid)
        with httpx.stream("POST", url, json=body, timeout=60) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data: "))
            next(lines)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            os.kill(engine, signal.SIGKILL)
            events = list(lines)
        assert events[-1] == "data: [DONE]" and '"error"' in events[-2]
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.communicate()[0]
    assert "restarted" not in log and "failed while the server was shutting down" in log, log[-3000:]


def test_a_stop_signal_during_start_up_exits_at_once(tokenizer: Tokenizer, tmp_path: Path) -> None:
    """Docker's stop during a long start (kernels building, a model loading, here a chat template whose
    check runs for its whole 10 s): nothing was accepted, so the server exits now, and its engine with it,
    rather than when the start would have finished."""
    model = tiny_model_folder(tokenizer, tmp_path / "tiny")
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    )
    config_path.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "server", "--model", str(model), "--port", str(free_port()), "--dtype", "float32",
           "--kv-cache-memory", "8MiB", "--max-model-len", "1024"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Waiting for application startup" in line:
            break
    time.sleep(1.0)
    children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    out = proc.communicate(timeout=30)[0]
    assert time.monotonic() - t0 < 5 and proc.returncode == 0, "".join(lines) + out
    assert "stop signal during start-up" in out
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in children), "the engine outlived the server"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False
