"""`meshllm serve --threads`: the compute threads of the stages on this machine."""

from __future__ import annotations

import subprocess
import sys

import pytest

from meshllm.cli.serve import stage_threads
from meshllm.errors import ConfigError


def test_by_default_the_stages_share_the_cores() -> None:
    assert stage_threads(None, stages_here=2, cores=2) == (1, False)
    assert stage_threads(None, stages_here=1, cores=8) == (8, False)
    assert stage_threads(None, stages_here=3, cores=2) == (1, True)  # at least one thread each


def test_more_threads_than_cores_in_all_is_said() -> None:
    assert stage_threads(2, stages_here=2, cores=2) == (2, True)
    assert stage_threads(2, stages_here=1, cores=2) == (2, False)


def test_a_thread_count_below_one_is_refused_naming_the_flag() -> None:
    with pytest.raises(ConfigError, match="--threads must be at least 1, got 0"):
        stage_threads(0, stages_here=2, cores=2)


def test_threads_alone_below_one_is_refused_naming_the_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshllm", "serve", "--model", "demo", "--threads-alone", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result
    assert "--threads-alone must be at least 1, got 0" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("command", "value", "message"),
    [
        ("serve", "2-1", "'2-1' in '2-1' is not a range of cores"),
        ("worker", "a,b", "'a,b' is not a list of cores such as 0-3 or 0-3,8-11"),
        ("worker", "4096", "--cores 4096: Invalid argument (this process may use cores"),
    ],
)
def test_cores_that_are_no_list_or_not_this_machine_s_are_refused_naming_the_flag(
    command: str, value: str, message: str
) -> None:
    argv = [sys.executable, "-m", "meshllm", command, "--cores", value]
    argv += ["--model", "demo"] if command == "serve" else ["--port", "0"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0, result
    assert message in result.stderr, result.stderr
