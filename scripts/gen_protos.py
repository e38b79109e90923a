"""Regenerates the gRPC stubs in client/secant/v1 from proto/secant/v1/*.proto.

The stubs are committed and never edited by hand; tests/unit/test_protos.py runs this into a
temporary folder and fails on any difference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
DEFAULT_OUT = ROOT / "client"


def generate(out_dir: Path) -> list[Path]:
    """Writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py under out_dir/secant/v1; returns them."""
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(PROTO_ROOT.glob("secant/v1/*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    package_dir = out_dir / "secant" / "v1"
    init = package_dir / "__init__.py"
    docstring = '"""Generated gRPC stubs for secant.v1 (scripts/gen_protos.py; do not edit)."""'
    init.write_text(docstring + "\n")
    return sorted(package_dir.glob("*.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
