"""Regenerate the committed protobuf code in sluice/v1 from proto/.

Usage: python scripts/genproto.py [OUT_DIR]

OUT_DIR defaults to the repository root; the freshness test passes a temporary directory
and compares. Uses the pinned grpcio-tools and mypy-protobuf from the environment.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import google.api
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def googleapis_include() -> Path:
    """The folder holding google/api/*.proto from the googleapis-common-protos wheel."""
    return Path(next(iter(google.api.__path__))).parent.parent


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.glob("sluice/v1/*.proto"))
    grpc_tools_include = Path(protoc.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{googleapis_include()}",
        f"-I{grpc_tools_include}",
        f"--plugin=protoc-gen-mypy={shutil.which('protoc-gen-mypy', path=str(bindir))}",
        f"--plugin=protoc-gen-mypy_grpc={shutil.which('protoc-gen-mypy_grpc', path=str(bindir))}",
        f"--python_out={out}",
        f"--mypy_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    pkg = out / "sluice" / "v1"
    (pkg / "__init__.py").write_text('"""Generated protobuf and gRPC code for sluice.v1."""\n')


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
