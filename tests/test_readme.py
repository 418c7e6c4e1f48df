"""README's table of config groups names every option under ``cl_bench/conf/`` (a preset added without it
fails here), so a user reading the README sees every protocol and experiment there is."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF = REPO_ROOT / "cl_bench" / "conf"


def table_row(group: str) -> str:
    rows = [
        line
        for line in (REPO_ROOT / "README.md").read_text().splitlines()
        if line.startswith(f"| `{group}` |")
    ]
    assert len(rows) == 1, f"README has {len(rows)} table rows for {group}"
    return rows[0].split("|")[2]


def expand(pattern: str) -> set[str]:
    """``slca/{cifar100,cub}{,_pp}`` -> its names (brace alternatives, as a shell expands them)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return {pattern}
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return set().union(*(expand(head + alt + tail) for alt in match.group(1).split(",")))


def listed(group: str) -> tuple[set[str], set[str]]:
    """The names the README's row lists for ``group``, and the families it lists as ``family/...``."""
    names: set[str] = set()
    families: set[str] = set()
    for code in re.findall(r"`([^`]+)`", table_row(group)):
        if code.endswith("/..."):
            families.add(code[: -len("/...")])
        else:
            names |= expand(code)
    return names, families


@pytest.mark.parametrize(
    "group", ["dataset", "backbone", "method", "scenario", "trainer", "logger", "protocol", "experiment"]
)
def test_the_readme_lists_every_option_of_a_group(group: str) -> None:
    names, families = listed(group)
    options = sorted(
        p.relative_to(CONF / group).with_suffix("").as_posix() for p in (CONF / group).rglob("*.yaml")
    )
    missing = [o for o in options if o not in names and o.split("/")[0] not in families]
    assert not missing, f"README's `{group}` row does not list {missing}"
    if group in ("protocol", "experiment"):  # the row lists presets only
        assert names <= set(options), (
            f"README's `{group}` row lists {sorted(names - set(options))}, not presets"
        )
