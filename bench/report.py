"""What every table-printing benchmark does at the end: print the table and save it as markdown."""

from __future__ import annotations

import datetime as dt
from pathlib import Path


def save_table(lines: list[str], path: Path) -> str:
    """Join `lines` into a markdown table, print it, write it to `path` (folders made); return it."""
    table = "\n".join(lines) + "\n"
    print(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    print(f"saved {path}")
    return table


def print_report(text: str, out: Path | None, name: str) -> Path | None:
    """Print `text`; with `out`, also save it as `out/<name>-<date>-<time>.md` (folders made)."""
    print(text)
    if out is None:
        return None
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{dt.datetime.now():%Y-%m-%d-%H%M}.md"
    path.write_text(text)
    print(f"saved {path}")
    return path
