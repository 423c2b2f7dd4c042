"""Where the C++ kernels are built and kept between starts."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from model import paged_kernel


def test_an_unwritable_home_builds_the_kernels_in_the_temp_dir_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    home = tmp_path / "home"
    home.write_text("a file where a folder should be")  # so nothing can be made under it
    monkeypatch.setenv("SMOLLM2_HOME", str(home))
    monkeypatch.delenv(paged_kernel.KERNEL_CACHE_VAR, raising=False)
    with caplog.at_level(logging.WARNING, logger=paged_kernel.log.name):
        root = paged_kernel._kernel_root()
    assert not root.is_relative_to(home) and "cannot be written" in caplog.text
    assert paged_kernel.KERNEL_CACHE_VAR in caplog.text
    monkeypatch.setenv("SMOLLM2_HOME", str(tmp_path))
    caplog.clear()
    assert paged_kernel._kernel_root() == tmp_path / "torch_extensions" and not caplog.text


def test_a_build_killed_mid_compile_does_not_stall_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's cpp_extension waits, without end, while its build folder's `lock` file exists: a process
    killed mid-compile leaves one. Under our own lock, the next start removes it and builds."""
    monkeypatch.setenv(paged_kernel.KERNEL_CACHE_VAR, str(tmp_path))
    monkeypatch.setattr(paged_kernel, "_in_process", lambda: False)  # as in a fresh process
    build = paged_kernel._build_dir()
    build.mkdir(parents=True)
    (build / "lock").write_text("")  # what the killed build left
    seen: list[bool] = []
    monkeypatch.setattr(paged_kernel, "_compile_and_load", lambda b: seen.append((b / "lock").exists()))
    paged_kernel._build_and_load()
    assert seen == [False]
