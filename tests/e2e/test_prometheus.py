"""Prometheus really scrapes the server: start the server and Debian's ``prometheus`` binary on
127.0.0.1, serve one completion, then ask Prometheus' HTTP API for the server's metrics."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.real_model, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
JOB = "smollm2"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def _wait_for(what: str, check: Callable[[], Any], proc: subprocess.Popen[bytes], timeout: float) -> Any:
    """Poll ``check`` until it returns something truthy; fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}")
        try:
            result = check()
        except OSError:  # not listening yet, 503 while loading, ...
            result = None
        if result:
            return result
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {timeout:.0f}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    defaults = pytest.importorskip("model.defaults")
    try:
        model = defaults.require_default_model()
    except defaults.DefaultModelMissing as err:
        pytest.skip(str(err))
    port = _free_port()
    log = (tmp_path_factory.mktemp("server") / "server.log").open("wb")
    cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), "--model", str(model)]
    env = {k: v for k, v in os.environ.items() if k != "SMOLLM2_API_KEY"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(
            "server /health",
            lambda: urllib.request.urlopen(url + "/health", timeout=2).status == 200,
            proc,
            120,
        )
        yield url
    finally:
        _stop(proc)
        log.close()


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def prometheus(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Debian's prometheus binary is not installed (apt-get install prometheus; .ci/run does)")
    work = tmp_path_factory.mktemp("prometheus")
    target = urllib.parse.urlsplit(server_url).netloc
    config = f"global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['{target}']\n"
    (work / "prometheus.yml").write_text(config)
    port = _free_port()
    cmd = [
        binary,
        f"--config.file={work / 'prometheus.yml'}",
        f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    log = (work / "prometheus.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(
            "prometheus ready",
            lambda: urllib.request.urlopen(url + "/-/ready", timeout=2).status == 200,
            proc,
            60,
        )
        yield Prometheus(url, proc)
    finally:
        _stop(proc)
        log.close()


def _query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    body = _get_json(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert body["status"] == "success", body
    return body["data"]["result"]


def _complete(server: str) -> dict[str, Any]:
    model = _get_json(server + "/v1/models")["data"][0]["id"]
    payload = {"model": model, "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}
    request = urllib.request.Request(
        server + "/v1/completions", json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def test_prometheus_scrapes_server_metrics(server_url: str, prometheus: Prometheus) -> None:
    prometheus_url, proc = prometheus.url, prometheus.proc
    up = _wait_for("scrape of the server", lambda: _query(prometheus_url, f'up{{job="{JOB}"}}'), proc, 30)
    assert up[0]["value"][1] == "1", f"Prometheus cannot scrape the server: {up}"

    running = _wait_for(
        "engine gauge", lambda: _query(prometheus_url, "smollm2:num_requests_running"), proc, 15
    )
    assert running[0]["metric"]["job"] == JOB

    generated = _complete(server_url)["usage"]["completion_tokens"]
    assert generated > 0

    def counted() -> list[dict[str, Any]]:
        result = _query(prometheus_url, "smollm2:generation_tokens_total")
        return result if result and float(result[0]["value"][1]) >= generated else []

    # The counter Prometheus stored must include this request's tokens.
    _wait_for("generation_tokens_total after a completion", counted, proc, 15)
    ttft = _query(prometheus_url, "smollm2:time_to_first_token_seconds_count")
    assert ttft and float(ttft[0]["value"][1]) >= 1
