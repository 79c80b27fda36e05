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


def test_figure_placeholders_only_in_the_sizing_table() -> None:
    sizing = DOC.index("\n## Sizing\n")
    before, section = DOC[:sizing], DOC[sizing:]
    assert "TODO" not in before
    lines = [line for line in section.splitlines() if "TODO" in line]
    assert lines, "the Sizing table has its placeholders"
    for line in lines:
        assert line.startswith("| "), line
        assert "TODO" not in line.replace("TODO(figures)", ""), line
