"""bench/sampler.py, the sampler's benchmark: one short run end to end, its JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "sampler.py"


def test_a_short_run_reports_every_setting_per_step_and_per_token() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--vocab", "5000", "--sequences", "4", "--repeats", "3", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["vocab"] == 5000 and report["sequences"] == 4
    assert set(report["settings"]) == {"greedy", "temperature 1", "top_p 0.9", "top_k 40, top_p 0.95"}
    for figures in report["settings"].values():
        assert figures["ms_per_step"] > 0
        assert abs(figures["ms_per_token"] * 4 - figures["ms_per_step"]) < 1e-9
