"""The committed generated protobuf code is exactly what the pinned grpcio-tools makes from the .proto."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshllm.transport.proto.generate import PROTO_DIR, generate

GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def test_generated_protos_are_identical_to_the_committed_ones(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (a dev dependency) regenerates the protos")
    generated = generate(out_root=tmp_path)
    committed = sorted(path for path in PROTO_DIR.iterdir() if path.name.endswith(GENERATED_SUFFIXES))

    assert [path.name for path in generated] == [path.name for path in committed]
    for fresh in generated:
        assert fresh.read_bytes() == (PROTO_DIR / fresh.name).read_bytes(), (
            f"{fresh.name} is stale: run `make proto` and commit the result"
        )
