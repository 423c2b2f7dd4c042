"""Plot serving-benchmark results: throughput and inter-token latency against concurrency.

python -m bench.plot bench/results/2026-11-28-0700.json     # re-plot a saved run
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _series(row: dict[Any, Any], key: str) -> tuple[list[int], list[float]]:
    """(concurrency, value) pairs of one peer's measured cells; 'unavailable' cells are skipped."""
    xs, ys = [], []
    numeric = [(c, cell) for c, cell in row.items() if str(c).isdigit()]  # not the "prefill" probe
    for c, cell in sorted(numeric, key=lambda kv: int(kv[0])):
        d = cell.to_dict() if hasattr(cell, "to_dict") else cell
        if isinstance(d, dict) and d.get(key) is not None:
            xs.append(int(c))
            ys.append(float(d[key]))
    return xs, ys


def plot_results(table: dict[str, dict[Any, Any]], out: Path) -> Path:
    """Two panels: output tok/s and ITL p50 (ms) per server, log2 concurrency axis."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt

    fig, (ax_tp, ax_itl) = plt.subplots(1, 2, figsize=(11, 4.2))
    for peer, row in table.items():
        style = {"linewidth": 2.5} if peer == "ours" else {"linestyle": "--"}
        xs, ys = _series(row, "tok_per_s")
        if xs:
            ax_tp.plot(xs, ys, marker="o", label=peer, **style)
        xs, ys = _series(row, "itl_p50_ms")
        if xs:
            ax_itl.plot(xs, ys, marker="o", label=peer, **style)
    for ax, title, ylabel in (
        (ax_tp, "Output throughput", "tokens / s"),
        (ax_itl, "Inter-token latency (p50)", "ms"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print(__doc__)
        return 2
    src = Path(args[0])
    print(plot_results(json.loads(src.read_text()), src.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
