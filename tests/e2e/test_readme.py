"""The README tells the truth about the code: the two first commands, the settings table (flags, env
variables, defaults), the metric names and the make targets it mentions.

The reference values come from the code itself (the argparse parser that ``python -m server --help``
prints, the ``Settings`` dataclass, a live ``ServerMetrics`` registry, the Makefile), never copied here.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any

import pytest

from server.metrics import ServerMetrics
from server.settings import ENV_PREFIX, Settings, build_parser, parse_bool, parse_bytes

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
TABLE_MARKER = "<!-- settings-table"


def _first_bash_block(text: str) -> str:
    match = re.search(r"```bash\n(.*?)```", text, re.S)
    assert match, "README has no ```bash block"
    return match.group(1)


def _settings_rows() -> list[list[str]]:
    """Cells of the settings table's body rows (the table right after the marker comment)."""
    start = README.index(TABLE_MARKER)
    rows = []
    for line in README[start:].splitlines()[1:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert len(rows) > 2, "settings table not found after the marker"
    return rows[2:]  # header and separator


def _code(cell: str) -> str:
    return cell.strip().strip("`")


def _cli_flags() -> set[str]:
    """Flags of `python -m server --help`, from the same parser (spawning it costs seconds)."""
    help_text = build_parser().format_help()
    return set(re.findall(r"(?m)^\s+(--[a-z][a-z0-9-]*)", help_text)) - {"--help"}


def _default(f: Field[Any]) -> Any:
    return f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]


def _parse_documented_default(cell: str, example: Any) -> Any:
    """The README's default cell as a value of the field's type ("unset" = None, "empty" = [])."""
    text = _code(cell)
    if text == "unset":
        return None
    if text == "empty":
        return []
    if isinstance(example, bool):
        return parse_bool(text)
    if isinstance(example, int):
        return parse_bytes(text)  # plain integers and sizes such as 1GiB
    if isinstance(example, float):
        return float(text)
    return text


def test_first_bash_block_has_make_serve_and_make_test() -> None:
    before_first_section = README.split("\n## ", 1)[0]
    block = _first_bash_block(before_first_section)
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]
    assert commands[:2] == ["make serve", "make test"]


def test_settings_table_flags_equal_the_cli_flags() -> None:
    documented = [_code(row[0]) for row in _settings_rows()]
    assert len(documented) == len(set(documented)), "a flag is listed twice"
    assert set(documented) == _cli_flags()
    assert set(documented) == {"--" + f.name.replace("_", "-") for f in fields(Settings)}


def test_settings_table_env_vars_and_defaults_match_settings() -> None:
    by_flag = {"--" + f.name.replace("_", "-"): f for f in fields(Settings)}
    for flag, env, default, _meaning in (row[:4] for row in _settings_rows()):
        f = by_flag[_code(flag)]
        assert _code(env) == ENV_PREFIX + f.name.upper()
        expected = _default(f)
        assert _parse_documented_default(default, expected) == expected, f"default of {_code(flag)}"


def _exported_metrics() -> tuple[set[str], set[str]]:
    """(every exported sample name, the documented name of each family: counters with `_total`)."""

    class AnyStats(dict[str, float]):
        def __missing__(self, key: str) -> float:
            return 0.0

        def __contains__(self, key: object) -> bool:
            return True

    registry = ServerMetrics(lambda: AnyStats()).registry
    families = list(registry.collect())
    samples = {s.name for family in families for s in family.samples}
    documented = {f.name + "_total" if f.type == "counter" else f.name for f in families}
    assert "smollm2:num_requests_waiting" in documented, "sanity: engine gauges must be exported"
    return samples, documented


def test_every_readme_metric_is_exported_and_every_metric_is_documented() -> None:
    samples, families = _exported_metrics()
    mentioned = set(re.findall(r"smollm2:[a-z0-9_]+", README))
    assert mentioned - samples - families == set()
    assert families - mentioned == set()


@pytest.mark.parametrize("target", sorted(set(re.findall(r"\bmake ([a-z][a-z-]*)", README))))
def test_every_make_target_in_readme_exists(target: str) -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"(?m)^{re.escape(target)}:", makefile), f"Makefile has no target {target}"
