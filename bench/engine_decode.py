"""The torch engine alone, at a real model shape: decode and prefill tokens/s, and how much of the
machine's memory bandwidth a decode step reaches.

One stage holds every layer of a random-weight Qwen3 checkpoint (bfloat16, made once under
~/.cache/meshllm-bench/) and is driven directly with steps, no scheduler, no server: decode of 1 and of 16
sequences per step at a context of about --context tokens, and prefill of one --prompt-token prompt, at
each thread count, for each weight mode (bfloat16; int8 and int4 where the engine offers them).

Decode reads every weight once per step, so its ceiling is bandwidth / bytes read per step. Each row
gives the weights read per token (the stage's parameters, less the embedding table when the embedding is
only a lookup; a tied lm_head reads that matrix once a step), the rate that makes (GB/s) and its fraction
of the read bandwidth measured in the same run (a large float32 tensor summed, at the same thread count,
at the start and at the end; the fraction is of the highest, since other work on the machine only lowers it).
Decode of 16 sequences also reads their KV caches (not counted here).

With --llamacpp DIR it runs DIR/build/bin/llama-bench on GGUFs of the same checkpoint (bf16, q8_0, q4_0;
-p PROMPT -n 64) and prints meshllm / llama.cpp beside each row (bfloat16 ↔ bf16, int8 ↔ q8_0,
int4 ↔ q4_0; llama-bench's tg64 decodes one sequence from an empty context).

    .venv/bin/python bench/engine_decode.py [--shape 0.6b|1.7b] [--llamacpp DIR] [--json] [--plot FILE.png]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from bench_common import (
    SHAPES,
    gguf_file,
    llamacpp_binary,
    llamacpp_commit,
    machine_load,
    shape_checkpoint,
    show,
    spread,
)

from meshllm.errors import ConfigError
from meshllm.step import Segment, StepInput

MODES = {"bfloat16": None, "int8": "int8", "int4": "int4"}  # row label -> load_stage(quantize=...)
GGUF_OF_MODE = {"bfloat16": "bf16", "int8": "q8_0", "int4": "q4_0"}
BATCH = 16  # sequences in the batched decode rows


@dataclass
class Row:
    mode: str
    threads: int
    test: str  # "prefill 512", "decode 1", "decode 16"
    tokens_per_s: dict[str, float]
    weight_bytes_per_token: float
    bandwidth_fraction: float = 0.0
    llamacpp_tokens_per_s: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def weight_gb_per_s(self) -> float:
        return self.weight_bytes_per_token * self.tokens_per_s["median"] / 1e9


def read_bandwidth(threads: int, repeats: int, size_mb: int = 512) -> list[float]:
    """GB/s of summing a `size_mb` float32 tensor (far larger than the caches), `repeats` samples."""
    import torch

    torch.set_num_threads(threads)
    tensor = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32)
    tensor.sum()  # fault every page in
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(4):
            tensor.sum()
        rates.append(4 * tensor.numel() * 4 / (time.perf_counter() - started) / 1e9)
    return rates


def load(path: Path, num_layers: int, quantize: str | None) -> Any:
    """The whole model as one bfloat16 stage; None when the engine refuses the quantize mode."""
    from meshllm.engines import load_stage

    options: dict[str, Any] = {} if quantize is None else {"quantize": quantize}
    try:
        return load_stage("torch", str(path), (0, num_layers), dtype="bfloat16", **options)
    except (TypeError, ConfigError) as error:
        if quantize is None:
            raise
        print(f"note: skipping {quantize}: the torch engine refused it ({error})", file=sys.stderr)
        return None


def weights_read_per_step(stage: Any) -> int:
    """The stage's parameter bytes, less the embedding table when it is only looked up (not the lm_head)."""
    total = int(stage.weight_bytes())
    model = stage.model
    embedding = getattr(model, "embed_tokens", None)
    lm_head = getattr(model, "lm_head", None)
    if embedding is not None and (
        lm_head is None or getattr(lm_head, "weight", None) is not embedding.weight
    ):
        total -= sum(p.numel() * p.element_size() for p in embedding.parameters())
    return total


class Driver:
    """Steps through one stage by hand: prompts as single steps, decode steps of many sequences."""

    def __init__(self, stage: Any, vocab_size: int):
        self.stage = stage
        self.rng = np.random.default_rng(0)
        self.vocab_size = vocab_size
        self.step_id = 0

    def prompt(self, n_tokens: int) -> np.ndarray:
        return self.rng.integers(3, self.vocab_size, size=n_tokens).astype(np.int64)  # no special tokens

    def forward(self, segments: list[Segment], token_ids: np.ndarray) -> np.ndarray:
        self.step_id += 1
        output = self.stage.forward(StepInput(self.step_id, segments, token_ids=token_ids))
        return np.asarray(output.logits).argmax(axis=-1)  # [S] greedy next tokens

    def prefill(self, seq_ids: list[int], length: int) -> dict[int, int]:
        """Prompts of `length` tokens for `seq_ids`, in one step; each one's next token."""
        segments = [Segment(seq_id, 0, length, sample=True) for seq_id in seq_ids]
        tokens = self.forward(segments, np.concatenate([self.prompt(length) for _ in seq_ids]))
        return dict(zip(seq_ids, (int(t) for t in tokens), strict=True))

    def decode(self, next_tokens: dict[int, int], context: int, steps: int) -> float:
        """Seconds for `steps` decode steps of every sequence, from position `context` (a restart there)."""
        tokens = dict(next_tokens)
        started = time.perf_counter()
        for index in range(steps):
            segments = [Segment(seq_id, context + index, 1, sample=True) for seq_id in tokens]
            sampled = self.forward(segments, np.array(list(tokens.values()), dtype=np.int64))
            tokens = dict(zip(tokens, (int(t) for t in sampled), strict=True))
        return time.perf_counter() - started


def measure_mode(
    path: Path, mode: str, num_layers: int, vocab_size: int, args: argparse.Namespace
) -> list[Row]:
    import torch

    stage = load(path, num_layers, MODES[mode])
    if stage is None:
        return []
    driver = Driver(stage, vocab_size)
    per_step = weights_read_per_step(stage)
    torch.set_num_threads(max(args.threads))
    # The decode contexts, made once and shared by every thread count: sequence 0 alone, 1..16 batched.
    next_tokens = driver.prefill(list(range(BATCH + 1)), args.context)
    single, batched = {0: next_tokens[0]}, {s: next_tokens[s] for s in range(1, BATCH + 1)}
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        driver.decode(single, args.context, 2)  # warm up at this thread count
        for label, tokens in (("decode 1", single), (f"decode {BATCH}", batched)):
            rates = [
                len(tokens) * args.steps / driver.decode(tokens, args.context, args.steps)
                for _ in range(args.repeats)
            ]
            rows.append(Row(mode, threads, label, spread(rates), per_step / len(tokens)))
        rates = []
        for repeat in range(args.repeats):
            seq_id = 1000 + repeat
            started = time.perf_counter()
            driver.prefill([seq_id], args.prompt)
            rates.append(args.prompt / (time.perf_counter() - started))
            stage.release([seq_id])
        rows.append(Row(mode, threads, f"prefill {args.prompt}", spread(rates), per_step / args.prompt))
    del driver, stage
    return rows


def run_llama_bench(llamacpp: Path, checkpoint: Path, kind: str, args: argparse.Namespace) -> list[dict]:
    """llama-bench's results for one GGUF type: the fields the tables use."""
    model = gguf_file(checkpoint, llamacpp, kind)
    command = [str(llamacpp_binary(llamacpp, "llama-bench")), "-m", str(model), "-o", "json"]
    command += ["-p", str(args.prompt), "-n", "64", "-t", ",".join(map(str, args.threads))]
    command += ["-r", str(args.repeats)]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=1800).stdout
    keys = ("model_type", "model_size", "n_threads", "n_prompt", "n_gen", "samples_ts")
    return [{key: result[key] for key in keys} for result in json.loads(output)]


def llamacpp_figures(results: list[dict], threads: int, test: str) -> dict[str, Any] | None:
    """The llama-bench result matching a row, as a spread of tokens/s: its tg for 'decode 1', its pp for
    'prefill N'; none for batched decode (llama-bench decodes one sequence)."""
    if test == f"decode {BATCH}":
        return None
    for result in results:
        if result["n_threads"] == threads and (result["n_gen"] > 0) == (test == "decode 1"):
            figures: dict[str, Any] = spread(list(result["samples_ts"]))
            figures["model_bytes"] = result["model_size"]
            figures["tokens"] = result["n_gen"] or result["n_prompt"]
            return figures
    return None


def print_llamacpp(results: dict[str, list[dict]], bandwidth: dict[int, dict[str, float]]) -> None:
    """llama-bench's own rows, with the same bytes-per-token arithmetic (tied: the GGUF's bytes a step)."""
    print(
        f"{'llama.cpp':<9} {'thr':>3}  {'test':<12} {'tok/s':>22}  {'MB/token':>8}  {'GB/s':>5}  {'of bw':>5}"
    )
    for kind, entries in results.items():
        for result in entries:
            tokens = result["n_gen"] or result["n_prompt"]
            test = "decode 1" if result["n_gen"] else f"prefill {tokens}"
            figures = spread(list(result["samples_ts"]))
            per_token = result["model_size"] / (1 if result["n_gen"] else tokens)
            rate = per_token * figures["median"] / 1e9
            threads = result["n_threads"]
            fraction = f"{rate / bandwidth[threads]['max']:>5.0%}" if threads in bandwidth else f"{'-':>5}"
            print(
                f"{kind:<9} {threads:>3}  {test:<12} {show(figures):>22}  {per_token / 1e6:>8.1f}  "
                f"{rate:>5.1f}  {fraction}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="0.6b", choices=sorted(SHAPES))
    parser.add_argument("--modes", default="bfloat16,int8,int4", help="comma-separated weight modes")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--context", type=int, default=128, help="tokens in each decoding sequence's cache")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per repeat")
    parser.add_argument("--prompt", type=int, default=512, help="tokens of the prefill prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--llamacpp", type=Path, default=None, help="a llama.cpp checkout built in DIR/build")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="also draw the figures to FILE.png (needs matplotlib)"
    )
    args = parser.parse_args()
    args.threads = [int(n) for n in args.threads.split(",")]
    modes = [mode for mode in args.modes.split(",") if mode]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        parser.error(f"--modes: {unknown[0]!r} is not one of {', '.join(MODES)}")

    import torch

    spec = SHAPES[args.shape]
    checkpoint = shape_checkpoint(args.shape)
    load_before = machine_load()
    samples = {threads: read_bandwidth(threads, args.repeats) for threads in args.threads}
    rows: list[Row] = []
    for mode in modes:
        rows += measure_mode(checkpoint, mode, spec.num_hidden_layers, spec.vocab_size, args)
    for threads in args.threads:  # measured again at the end: other work on the machine only lowers it
        samples[threads] += read_bandwidth(threads, args.repeats)
    bandwidth = {threads: spread(rates) for threads, rates in samples.items()}
    for row in rows:
        row.bandwidth_fraction = row.weight_gb_per_s / bandwidth[row.threads]["max"]

    commit, llama_results = None, {}
    if args.llamacpp is not None:
        commit = llamacpp_commit(args.llamacpp)
        for mode in modes:
            kind = GGUF_OF_MODE[mode]
            llama_results[kind] = run_llama_bench(args.llamacpp, checkpoint, kind, args)
            for row in rows:
                if row.mode == mode:
                    row.llamacpp_tokens_per_s = llamacpp_figures(llama_results[kind], row.threads, row.test)

    print(
        f"checkpoint: qwen3-{args.shape} shape, random weights, {spec.num_hidden_layers} layers, "
        f"hidden {spec.hidden_size}, vocab {spec.vocab_size}, bfloat16; torch {torch.__version__}; "
        f"{args.repeats} repeats, median (min–max)"
    )
    print(f"machine: {load_before} at the start, {machine_load()} at the end")
    print(
        "read bandwidth (at the start and the end; 'of bw' is of the max): "
        + ", ".join(f"{threads} thread(s) {show(bandwidth[threads])} GB/s" for threads in args.threads)
    )
    if commit is not None:
        print(f"llama.cpp: {commit} (llama-bench -p {args.prompt} -n 64, bf16 / q8_0 / q4_0)")
    header = f"{'mode':<9} {'thr':>3}  {'test':<12} {'tok/s':>22}  {'MB/token':>8}  {'GB/s':>5}  {'of bw':>5}"
    if commit is not None:
        header += f"  {'llama.cpp tok/s':>22}  {'ratio':>5}"
    print(header)
    for row in rows:
        line = (
            f"{row.mode:<9} {row.threads:>3}  {row.test:<12} {show(row.tokens_per_s):>22}  "
            f"{row.weight_bytes_per_token / 1e6:>8.1f}  {row.weight_gb_per_s:>5.1f}  "
            f"{row.bandwidth_fraction:>5.0%}"
        )
        if commit is not None:
            theirs = row.llamacpp_tokens_per_s
            if theirs is None:
                line += f"  {'-':>22}  {'-':>5}"
            else:
                line += f"  {show(theirs):>22}  {row.tokens_per_s['median'] / theirs['median']:>5.2f}"
        print(line)
    if commit is not None:
        print_llamacpp(llama_results, bandwidth)
    figures = {
        "shape": args.shape,
        "torch": torch.__version__,
        "machine": [load_before, machine_load()],
        "read_bandwidth_gbs": {str(threads): bandwidth[threads] for threads in args.threads},
        "rows": [
            {
                "mode": row.mode,
                "threads": row.threads,
                "test": row.test,
                "tokens_per_s": row.tokens_per_s,
                "weight_bytes_per_token": row.weight_bytes_per_token,
                "weight_gb_per_s": row.weight_gb_per_s,
                "bandwidth_fraction": row.bandwidth_fraction,
                "llamacpp_tokens_per_s": row.llamacpp_tokens_per_s,
            }
            for row in rows
        ],
        "llamacpp_commit": commit,
        "llamacpp": llama_results,
    }
    if args.json:
        print(json.dumps(figures))
    if args.plot:
        from plots import plot_engine_decode

        print(f"plot: {plot_engine_decode(figures, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
