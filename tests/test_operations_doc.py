"""docs/operations.md names only settings that exist, and its measured-figure placeholders
stay inside the Sizing table."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from sluice.config import Config

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "operations.md").read_text()


def _keys() -> dict[str, set[str]]:
    cfg = Config()
    return {
        section.name: {f.name for f in dataclasses.fields(getattr(cfg, section.name))}
        for section in dataclasses.fields(cfg)
    }


def test_every_setting_named_exists() -> None:
    keys = _keys()
    named = re.findall(r"`\[(\w+)\] (\w+)(\*?)", DOC)
    assert len(named) >= 20, "the doc names settings as `[section] key`"
    for section, key, wildcard in named:
        assert section in keys, f"[{section}] is not a config section"
        if wildcard:
            assert any(k.startswith(key) for k in keys[section]), f"[{section}] {key}*"
        else:
            assert key in keys[section], f"[{section}] {key} is not a config key"
    for var in re.findall(r"\bSLUICE_(\w+?)__(\w+)", DOC):
        section, key = var[0].lower(), var[1].lower()
        assert key in keys.get(section, set()), f"SLUICE_{var[0]}__{var[1]}"


def test_the_sizing_table_is_filled_in() -> None:
    sizing = DOC.index("\n## Sizing\n")
    rows = [line for line in DOC[sizing:].splitlines() if line.startswith("| ")]
    assert len(rows) >= 8, "the Sizing table is missing"
    assert "TODO" not in DOC, "a placeholder is left"
    for row in rows[1:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(cells), f"an empty cell: {row}"
