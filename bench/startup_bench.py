"""Start-up time and idle memory of `python -m server` with the default model (not in CI).

Each start is timed from launch to the first 200 of /health (polled every 20 ms). Cold: a fresh
$SMOLLM2_HOME holding only a link to the default GGUF, so the prepared model is built (the C++ kernels
come from their usual build cache: a first start ever also compiles them, ~30 s). Warm: the same home
again, the prepared model read from its cache. A few seconds after each start, with the server idle, the
RSS (VmRSS) of the server process and of each of its descendants (the engine process) is read.

    python -m bench.startup_bench --warm 3 --out bench/results
    python -m bench.startup_bench -- --max-num-seqs 32      # arguments after -- go to the server
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.peers import SERVED_NAME, RunningServer, free_port
from bench.report import print_report
from model.defaults import cache_dir, require_default_model


@dataclass
class Start:
    label: str
    seconds: float
    rss_mb: dict[str, float]  # "server" / "engine" (or the descendant's name) -> MB
    log_lines: list[str]

    @property
    def total_mb(self) -> float:
        return sum(self.rss_mb.values())


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def tree_rss(pid: int) -> dict[str, float]:
    """RSS of the server (the root) and of each descendant, named by its process title."""
    out: dict[str, float] = {}
    for i, p in enumerate(process_tree(pid)):
        name = "server" if i == 0 else _process_name(p)
        out[name if name not in out else f"{name}-{p}"] = rss_mb(p)
    return out


def _process_name(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    # spawned children run `python -c "from multiprocessing.spawn import spawn_main; ..."`; the spawn start
    # method also starts multiprocessing's resource tracker
    text = b" ".join(cmdline)
    if b"resource_tracker" in text:
        return "resource tracker"
    return "engine" if b"spawn_main" in text else str(pid)


def one_start(label: str, server_args: list[str], env: dict[str, str], idle_s: float) -> Start:
    port = free_port()
    argv = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), *server_args]
    log_path = Path(tempfile.gettempdir()) / f"smollm2-startup-{port}.log"
    base = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    with open(log_path, "wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    server = RunningServer("ours", proc, base, SERVED_NAME, log_path)
    try:
        seconds = _wait_health(proc, base, t0, log_path)
        time.sleep(idle_s)
        rss = tree_rss(proc.pid)
    finally:
        server.stop()
    lines = log_path.read_text(errors="replace").splitlines()
    keep = ("KV cache", "prepared", "kernels", "CPU:")
    return Start(label, seconds, rss, [ln for ln in lines if any(k in ln for k in keep)])


def _wait_health(proc: subprocess.Popen[bytes], base: str, t0: float, log_path: Path) -> float:
    with httpx.Client(timeout=1.0, trust_env=False) as client:
        while time.perf_counter() - t0 < 600:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; log: {log_path}")
            try:
                if client.get(base + "/health").status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
    raise RuntimeError(f"server not ready within 600 s; log: {log_path}")


def fresh_home() -> Path:
    """A home with only the default GGUF (linked), so the first start builds the prepared model."""
    home = Path(tempfile.mkdtemp(prefix="smollm2-startup-home-"))
    gguf = require_default_model()
    (home / gguf.name).symlink_to(gguf)
    return home


def report(starts: list[Start], server_args: list[str]) -> str:
    names = sorted({n for s in starts for n in s.rss_mb}, key=lambda n: (n != "server", n != "engine", n))
    lines = [
        f"# Start-up and idle memory ({dt.datetime.now():%Y-%m-%d %H:%M}), {os.cpu_count()} CPU cores",
        "",
        f"server args: `{' '.join(server_args) or '(defaults)'}`",
        "",
        "| start | seconds to /health 200 | "
        + " | ".join(f"RSS {n} MB" for n in names)
        + " | RSS total MB |",
        "|---|---|" + "---|" * len(names) + "---|",
    ]
    for s in starts:
        cells = " | ".join(f"{s.rss_mb.get(n, 0.0):.0f}" for n in names)
        lines.append(f"| {s.label} | {s.seconds:.2f} | {cells} | {s.total_mb:.0f} |")
    warm = [s.seconds for s in starts if s.label.startswith("warm")]
    if warm:
        lines += [
            "",
            f"warm median {statistics.median(warm):.2f} s (min {min(warm):.2f}, max {max(warm):.2f})",
        ]
    lines += ["", "Log lines of the last start:", "", *[f"    {ln}" for ln in starts[-1].log_lines]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.startup_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--warm", type=int, default=3, help="warm starts after the cold one")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold start (warm only)")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds after ready before reading RSS")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("server_args", nargs="*", help="arguments for `python -m server` (after --)")
    args = parser.parse_args()
    home = fresh_home()
    env = {**os.environ, "SMOLLM2_HOME": str(home)}
    env.setdefault("SMOLLM2_KERNEL_CACHE", str(cache_dir() / "torch_extensions"))
    starts: list[Start] = []
    try:
        if args.no_cold:  # a warm cache first, untimed
            one_start("cold", args.server_args, env, 0.0)
        else:
            starts.append(one_start("cold (prepared model built)", args.server_args, env, args.idle))
        for i in range(args.warm):
            starts.append(one_start(f"warm {i + 1}", args.server_args, env, args.idle))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    text = report(starts, args.server_args)
    print_report(text, args.out, "startup")


if __name__ == "__main__":
    main()
