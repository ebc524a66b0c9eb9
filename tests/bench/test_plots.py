"""bench/plots.py draws each bench script's --json report as a PNG (matplotlib, the bench extra)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import plots  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def spread(median: float) -> dict[str, float]:
    return {"median": median, "min": median * 0.9, "max": median * 1.1}


# A report of each script, in the shape its --json line has (figures made up).
REPORTS = {
    "serve_latency": {
        "tokens": 64,
        "machine": ["2 cores, load average 1.0", "2 cores, load average 1.2"],
        "stages": {
            str(stages): {
                str(level): {
                    "ttft_p50_ms": 30.0 * level,
                    "ttft_p90_ms": 40.0 * level,
                    "tokens_per_s_per_stream": 50.0 / stages,
                    "tokens_per_s_total": 50.0 * level / stages,
                }
                for level in (1, 4, 8)
            }
            for stages in (1, 2, 4)
        },
    },
    "vs_llamacpp": {
        "shape": "0.6b",
        "machine": ["a", "b"],
        "servers": {
            label: {
                "1": {"decode_tokens_per_s_a_stream": spread(8.0), "ttft_ms": spread(400.0)},
                "4": {"tokens_per_s_total": spread(16.0)},
                "16": {"tokens_per_s_total": spread(20.0)},
            }
            for label in ("meshllm, 1 stage, bf16", "llama.cpp, 1 process, bf16")
        },
    },
    "hop_overhead": {
        "stages": {
            "1": {"ms_per_token": 14.0, "tokens_per_s": 71.3, "batch8_tokens_per_s": 306.0},
            "2": {"ms_per_token": 18.9, "tokens_per_s": 52.9, "batch8_tokens_per_s": 311.0},
            "4": {"ms_per_token": 22.6, "tokens_per_s": 44.2, "batch8_tokens_per_s": 126.0},
        },
        "overhead_per_hop_ms": {"2": 4.9, "4": 2.9},
    },
    "engine_decode": {
        "shape": "0.6b",
        "rows": [
            {
                "mode": mode,
                "threads": threads,
                "test": test,
                "tokens_per_s": spread(10.0 * threads),
                "llamacpp_tokens_per_s": None if test == "decode 16" else spread(20.0),
            }
            for mode in ("bfloat16", "int8")
            for threads in (1, 2)
            for test in ("decode 1", "decode 16", "prefill 512")
        ],
    },
}


@pytest.mark.parametrize("script", sorted(REPORTS))
def test_each_report_is_drawn_as_a_png(script: str, tmp_path: Path) -> None:
    path = plots.PLOTS[script](REPORTS[script], tmp_path / "sub" / f"{script}.png")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000  # axes, lines and labels, not an empty canvas


def test_the_command_line_plots_a_saved_report(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    report.write_text(json.dumps(REPORTS["hop_overhead"]))
    png = tmp_path / "hop.png"
    done = subprocess.run(
        [sys.executable, str(BENCH / "plots.py"), "hop_overhead", str(report), str(png)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert png.read_bytes().startswith(PNG_MAGIC)
    bad = subprocess.run(
        [sys.executable, str(BENCH / "plots.py"), "hop_overhead", str(tmp_path / "missing.json"), str(png)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "missing.json" in bad.stderr


def test_every_bench_script_with_figures_takes_plot() -> None:
    for script in ("serve_latency.py", "vs_llamacpp.py", "engine_decode.py", "hop_overhead.py"):
        source = (BENCH / script).read_text()
        assert '"--plot"' in source and "from plots import" in source, script
        assert "import matplotlib" not in source, script  # lazily, in plots.py: the scripts run without it
