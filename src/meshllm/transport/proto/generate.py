"""Regenerate the committed *_pb2.py / *_pb2_grpc.py / *.pyi from the .proto files (`make proto`)."""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
SOURCE_ROOT = PROTO_DIR.parents[2]  # src/


def generate(out_root: Path = SOURCE_ROOT) -> list[Path]:
    """Compile every .proto here into `out_root` (mirroring the package path); returns the written files."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(PROTO_DIR.glob("*.proto"))
    args = [
        "protoc",
        f"-I{SOURCE_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p.relative_to(SOURCE_ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    package = out_root / PROTO_DIR.relative_to(SOURCE_ROOT)
    return sorted(p for p in package.iterdir() if p.name.endswith(("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")))


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(SOURCE_ROOT.parent) if path.is_relative_to(SOURCE_ROOT.parent) else path)
    sys.exit(0)
