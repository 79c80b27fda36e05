"""The committed generated code is fresh, and the protos pass buf lint and buf breaking."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "node_modules" / ".bin" / "buf"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "genproto.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = tmp_path / "sluice" / "v1"
    committed = ROOT / "sluice" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert names == sorted(p.name for p in committed.iterdir() if p.is_file())
    stale = [n for n in names if not filecmp.cmp(fresh / n, committed / n, shallow=False)]
    assert stale == [], f"regenerate with `python scripts/genproto.py`: {stale} differ"


def _buf_or_skip() -> None:
    if not BUF.exists():
        if shutil.which("npm") is None:
            pytest.skip("buf needs npm (the @bufbuild/buf package); npm is not installed")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=ROOT, check=True)


def test_buf_lint() -> None:
    _buf_or_skip()
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "buf.py"), "lint"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_against_previous_commit() -> None:
    _buf_or_skip()
    has_previous = (
        subprocess.run(
            ["git", "cat-file", "-e", "HEAD~1:proto"], cwd=ROOT, capture_output=True
        ).returncode
        == 0
    )
    if not has_previous:
        pytest.skip("no previous commit with proto/ to compare against (shallow clone?)")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "buf.py"), "breaking", "HEAD~1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
