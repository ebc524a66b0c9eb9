"""`meshllm cluster test`: one chat completion through a running cluster's API."""

from __future__ import annotations

from pathlib import Path

import pytest
from cluster_helpers import meshllm

pytestmark = pytest.mark.slow


def test_test_sends_one_chat_completion_and_reports_tokens_per_second(running_cluster: Path) -> None:
    result = meshllm("cluster", "test", "-c", running_cluster, "--max-tokens", "8")
    assert result.returncode == 0, str(result)
    assert result.stdout.rstrip().endswith("tok/s")
    assert " · 8 tokens · " in result.stdout


def test_test_without_a_running_cluster_says_to_look_at_its_status(cluster_files) -> None:
    path = cluster_files.local(workers=1)
    result = meshllm("cluster", "test", "-c", path)
    assert result.returncode == 1, result
    assert "is the cluster running? (`meshllm cluster status -c " in result.error
