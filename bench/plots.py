"""Plots of the bench scripts' figures: each script's `--plot FILE.png` calls one of these on the report it
prints with `--json`, and this file, run by itself, plots a report saved earlier:

    .venv/bin/python bench/plots.py serve_latency report.json docs/plots/serve_latency.png

matplotlib (the `bench` extra, part of `dev`) is imported only when a plot is made, so the scripts run
without it. Every figure with a spread (median, min, max) is drawn at its median with a min–max bar.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

Report = Mapping[str, Any]
GGUF_OF_MODE = {"bfloat16": "bf16", "int8": "q8_0", "int4": "q4_0"}  # llama.cpp's rows beside each mode


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "--plot needs matplotlib: pip install -e '.[bench]' (it is part of the dev extra)"
        ) from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _median_and_error(figure: float | Mapping[str, float]) -> tuple[float, tuple[float, float]]:
    """A plain number, or a spread: (median, (below, above)) for an error bar."""
    if isinstance(figure, Mapping):
        median = figure["median"]
        return median, (median - figure.get("min", median), figure.get("max", median) - median)
    return float(figure), (0.0, 0.0)


def _line(axes: Any, xs: list[int], figures: list[Any], label: str, dashed: bool = False) -> None:
    medians, errors = zip(*(_median_and_error(figure) for figure in figures), strict=True)
    below, above = zip(*errors, strict=True)
    style = "--" if dashed else "-"
    axes.errorbar(xs, medians, yerr=[below, above], marker="o", capsize=3, label=label, linestyle=style)


def _concurrency_axis(axes: Any, levels: list[int]) -> None:
    axes.set_xscale("log", base=2)
    axes.set_xticks(levels, [str(level) for level in levels])
    axes.set_xlabel("concurrent streams")
    axes.grid(True, alpha=0.3)


def _save(figure: Any, path: str | Path, title: str, note: str | None) -> Path:
    figure.suptitle(title)
    if note:
        figure.text(0.01, 0.01, note, fontsize=7, alpha=0.7)
    figure.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)
    return path


def _machine_note(report: Report) -> str | None:
    machine = report.get("machine")
    if isinstance(machine, list):
        return "machine: " + " → ".join(str(part) for part in machine)
    return str(machine) if machine else None


# ------------------------------------------------------------------------------------------ per script


def plot_serve_latency(report: Report, path: str | Path) -> Path:
    """bench/serve_latency.py: total tokens/s and TTFT against concurrency, a line per stage count."""
    plt = _pyplot()
    figure, (rate, ttft) = plt.subplots(1, 2, figsize=(10, 4))
    levels: set[int] = set()
    for stages, by_level in report["stages"].items():
        xs = sorted(int(level) for level in by_level)
        levels.update(xs)
        label = f"{stages} stage{'s' if int(stages) > 1 else ''}"
        _line(rate, xs, [by_level[str(x)]["tokens_per_s_total"] for x in xs], label)
        _line(ttft, xs, [by_level[str(x)]["ttft_p50_ms"] for x in xs], label)
    for axes in (rate, ttft):
        _concurrency_axis(axes, sorted(levels))
        axes.legend()
    rate.set_ylabel("tokens/s, all streams")
    ttft.set_ylabel("time to first token, p50 (ms)")
    title = f"meshllm serve through the API, {report.get('tokens', '?')} tokens a request"
    return _save(figure, path, title, _machine_note(report))


def _headline(figures: Mapping[str, Any], level: str) -> Any:
    """vs_llamacpp's figure of a level: one stream's decode tokens/s, or all streams' tokens/s."""
    key = "decode_tokens_per_s_a_stream" if level == "1" else "tokens_per_s_total"
    return figures[level][key]


def plot_vs_llamacpp(report: Report, path: str | Path) -> Path:
    """bench/vs_llamacpp.py: tokens/s against concurrency per server, and each server's TTFT."""
    plt = _pyplot()
    figure, (rate, ttft) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    servers: Mapping[str, Mapping[str, Any]] = report["servers"]
    levels: set[int] = set()
    for label, figures in servers.items():
        xs = sorted(int(level) for level in figures)
        levels.update(xs)
        _line(rate, xs, [_headline(figures, str(x)) for x in xs], label, dashed=label.startswith("llama.cpp"))
    _concurrency_axis(rate, sorted(levels))
    rate.set_ylabel("tokens/s (1 stream: its decode; more: all streams)")
    rate.legend(fontsize=7)
    first = str(min(levels))
    labels = [label for label, figures in servers.items() if "ttft_ms" in figures.get(first, {})]
    medians, errors = zip(
        *(_median_and_error(servers[label][first]["ttft_ms"]) for label in labels), strict=True
    )
    below, above = zip(*errors, strict=True)
    ttft.barh(labels, medians, xerr=[below, above], capsize=3)
    ttft.invert_yaxis()
    ttft.tick_params(axis="y", labelsize=7)
    ttft.set_xlabel(f"time to first token, {first} stream (ms)")
    ttft.grid(True, axis="x", alpha=0.3)
    title = f"meshllm and llama.cpp through the API (qwen3-{report.get('shape', '?')} shape)"
    return _save(figure, path, title, _machine_note(report))


def plot_hop_overhead(report: Report, path: str | Path) -> Path:
    """bench/hop_overhead.py: ms a token and tokens/s (1 and 8 sequences) per stage count, and the
    overhead of each hop."""
    plt = _pyplot()
    figure, (latency, rate) = plt.subplots(1, 2, figsize=(10, 4))
    stages = sorted(report["stages"], key=int)
    xs = [int(n) for n in stages]
    by_stage = report["stages"]
    latency.bar([str(x) for x in xs], [by_stage[n]["ms_per_token"] for n in stages], color="tab:blue")
    for n in stages:
        hop = report.get("overhead_per_hop_ms", {}).get(n)
        if hop is not None:
            latency.annotate(
                f"+{hop:.2f} ms/hop", (str(n), by_stage[n]["ms_per_token"]), ha="center", va="bottom"
            )
    latency.set_ylim(0, max(by_stage[n]["ms_per_token"] for n in stages) * 1.15)  # room for the labels
    latency.set_xlabel("stages")
    latency.set_ylabel("ms a token, one sequence")
    latency.grid(True, axis="y", alpha=0.3)
    _line(rate, xs, [by_stage[n]["tokens_per_s"] for n in stages], "1 sequence")
    _line(rate, xs, [by_stage[n]["batch8_tokens_per_s"] for n in stages], "8 sequences")
    rate.set_xticks(xs, [str(x) for x in xs])
    rate.set_xlabel("stages")
    rate.set_ylabel("decode tokens/s")
    rate.grid(True, alpha=0.3)
    rate.legend()
    return _save(figure, path, "What a pipeline hop costs (loopback, step links)", _machine_note(report))


def plot_engine_decode(report: Report, path: str | Path) -> Path:
    """bench/engine_decode.py: tokens/s per weight mode and test, a panel per thread count, with
    llama.cpp's figure beside meshllm's where there is one."""
    plt = _pyplot()
    rows = report["rows"]
    threads = sorted({row["threads"] for row in rows})
    tests = list(dict.fromkeys(row["test"] for row in rows))
    modes = list(dict.fromkeys(row["mode"] for row in rows))
    figure, panels = plt.subplots(1, len(threads), figsize=(6 * len(threads), 4.5), squeeze=False)
    width = 0.8 / (2 * len(modes))
    for axes, count in zip(panels[0], threads, strict=True):
        for index, mode in enumerate(modes):
            for theirs in (False, True):
                xs, medians, below, above = [], [], [], []
                for position, test in enumerate(tests):
                    row = next(
                        (r for r in rows if (r["mode"], r["threads"], r["test"]) == (mode, count, test)), None
                    )
                    figure_ = (
                        None if row is None else row["llamacpp_tokens_per_s" if theirs else "tokens_per_s"]
                    )
                    if figure_ is None:
                        continue
                    median, (low, high) = _median_and_error(figure_)
                    xs.append(position + (2 * index + theirs - len(modes) + 0.5) * width)
                    medians.append(median)
                    below.append(low)
                    above.append(high)
                if xs:
                    label = f"llama.cpp {GGUF_OF_MODE.get(mode, mode)}" if theirs else f"meshllm {mode}"
                    hatch = "//" if theirs else None
                    axes.bar(xs, medians, width, yerr=[below, above], capsize=2, label=label, hatch=hatch)
        axes.set_xticks(range(len(tests)), tests)
        axes.set_yscale("log")
        axes.set_ylabel("tokens/s (log)")
        axes.set_title(f"{count} thread{'s' if count > 1 else ''}")
        axes.grid(True, axis="y", alpha=0.3)
        axes.legend(fontsize=7)
    title = f"One torch stage at the qwen3-{report.get('shape', '?')} shape, next to llama-bench"
    return _save(figure, path, title, _machine_note(report))


PLOTS: dict[str, Callable[[Report, str | Path], Path]] = {
    "serve_latency": plot_serve_latency,
    "vs_llamacpp": plot_vs_llamacpp,
    "hop_overhead": plot_hop_overhead,
    "engine_decode": plot_engine_decode,
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("script", choices=sorted(PLOTS), help="the bench script whose --json report it is")
    parser.add_argument("report", type=Path, help="a JSON file: the script's --json line")
    parser.add_argument("png", type=Path, help="the plot to write")
    args = parser.parse_args()
    try:
        report = json.loads(args.report.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"{args.report}: {error}") from None
    print(PLOTS[args.script](report, args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
