"""Run buf offline: `python scripts/buf.py lint` or `python scripts/buf.py breaking REF`.

buf cannot reach its schema registry here, so the google/api and google/rpc protos come from
the googleapis-common-protos wheel, copied into the git-ignored .buf-deps module.
`breaking REF` compares proto/ with the same folder at git revision REF (e.g. HEAD~1).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import google.api

ROOT = Path(__file__).resolve().parent.parent
BUF = ROOT / "node_modules" / ".bin" / "buf"


def stage_deps(root: Path) -> None:
    src = Path(next(iter(google.api.__path__))).parent
    dest = root / ".buf-deps" / "google"
    for sub in ("api", "rpc"):
        target = dest / sub
        target.mkdir(parents=True, exist_ok=True)
        for proto in (src / sub).glob("*.proto"):
            shutil.copy2(proto, target / proto.name)


def main(argv: list[str]) -> int:
    if not BUF.exists():
        print("buf not installed: run `npm ci` in the repository root", file=sys.stderr)
        return 2
    stage_deps(ROOT)
    if argv[:1] == ["lint"]:
        return subprocess.call([str(BUF), "lint"], cwd=ROOT)
    if argv[:1] == ["build"]:
        return subprocess.call([str(BUF), "build", "-o", "/dev/null"], cwd=ROOT)
    if len(argv) == 2 and argv[0] == "breaking":
        with tempfile.TemporaryDirectory() as tmp:
            old = Path(tmp)
            archive = subprocess.run(
                ["git", "archive", argv[1], "proto", "buf.yaml"],
                cwd=ROOT,
                check=True,
                capture_output=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
            stage_deps(old)
            return subprocess.call([str(BUF), "breaking", "--against", str(old)], cwd=ROOT)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
