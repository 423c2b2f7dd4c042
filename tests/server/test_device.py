"""Device resolution: a CUDA build of torch on a machine without a GPU says that it runs on CPU."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch

from server.core_setup import resolve_device_dtype
from server.settings import Settings


@pytest.fixture(autouse=True)
def _capture_server_log(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """caplog's handler on the "server" logger itself: other tests' log set-up may stop propagation."""
    logger = logging.getLogger("server")
    logger.addHandler(caplog.handler)
    yield
    logger.removeHandler(caplog.handler)


def test_cuda_torch_without_a_gpu_logs_the_cpu_fallback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with caplog.at_level(logging.WARNING, logger="server"):
        device, dtype = resolve_device_dtype(Settings.from_args([], env={}))
    assert (device, dtype) == ("cpu", "bfloat16")
    assert "falling back to CPU" in caplog.text and "CUDA 13.0" in caplog.text


def test_cpu_torch_and_an_explicit_device_log_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="server"):
        monkeypatch.setattr(torch.version, "cuda", None)
        assert resolve_device_dtype(Settings.from_args([], env={}))[0] == "cpu"
        monkeypatch.setattr(torch.version, "cuda", "13.0")
        assert resolve_device_dtype(Settings.from_args(["--device", "cpu"], env={}))[0] == "cpu"
    assert "falling back" not in caplog.text
