"""bench/comm_bench.py, the communicator's benchmark: its arguments, and one short run end to end."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "bench" / "comm_bench.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("comm_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


comm_bench = load_script()


def test_sizes_take_binary_units() -> None:
    parse_size, parse_sizes = comm_bench.parse_size, comm_bench.parse_sizes
    assert parse_size("4096") == 4096
    assert parse_size("4KiB") == parse_size("4k") == 4096
    assert parse_size("64MiB") == 64 << 20
    assert parse_sizes("1KiB, 1MiB") == [1024, 1 << 20]
    for bad in ["", "3", "10 parsecs", "1.5MiB", "-4"]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)


def test_bench_arguments() -> None:
    args = comm_bench.build_parser().parse_args(["--world-size", "4", "--json", "--sizes", "1KiB,2MiB"])
    assert (args.world_size, args.json, args.sizes) == (4, True, [1024, 2 << 20])
    assert not args.no_gloo and args.round_trips == 1000 and args.transport == "link"
    assert comm_bench.build_parser().parse_args(["--transport", "both"]).transport == "both"


def test_a_world_of_one_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert comm_bench.main(["--world-size", "1"]) == 1
    assert "--world-size 2 or more" in capsys.readouterr().err


@pytest.mark.timeout(90)
def test_a_short_bench_of_both_transports_prints_a_table_and_json_last(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [
        "--world-size",
        "2",
        "--json",
        "--sizes",
        "1KiB,256KiB",
        "--round-trips",
        "30",
        "--transport",
        "both",
    ]
    assert comm_bench.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(lines[-1])
    assert figures["world_size"] == 2
    for backend in ["meshllm", "meshllm-grpc", "gloo"]:
        assert set(figures[backend]["all_reduce"]) == {"1024", "262144"}
        assert figures[backend]["all_reduce"]["262144"]["busbw_gbps"] > 0
        assert figures[backend]["latency"]["4096"]["p50_ms"] > 0
    assert any("all_reduce" in line for line in lines[:-1])


def test_meshllm_has_no_comm_command() -> None:
    from meshllm.cli import COMMANDS

    assert "comm" not in COMMANDS
