"""What every table-printing benchmark does at the end: print the table and save it as markdown."""

from __future__ import annotations

from pathlib import Path


def save_table(lines: list[str], path: Path) -> str:
    """Join `lines` into a markdown table, print it, write it to `path` (folders made); return it."""
    table = "\n".join(lines) + "\n"
    print(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    print(f"saved {path}")
    return table
