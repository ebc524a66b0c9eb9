"""The ggml engine alone at a real model shape, against llama-bench on the same weight types, interleaved.

One ggml stage holds every layer of the random-weight Qwen3 checkpoint (made once under
~/.cache/meshllm-bench/) and is driven directly with steps, no scheduler, no server: decode of one
sequence and of --batch sequences per step, each from a context of --context tokens, for each weight mode
(int8 → q8_0, int4 → q4_K, bfloat16) and thread count. Each round runs, per mode and thread count, the
engine's decode and then `llama-bench -p 0 -n 64 -r 1 -t T` on a GGUF of the same checkpoint in the same
types, so load from other work on the machine falls on both alike; the figures are the median and range
over the rounds, and the ratio is the engine's tokens/s over llama.cpp's.

The same types: the int8 stage holds every matrix in q8_0, as llama-quantize's Q8_0 does; the int4 stage
holds every matrix in q4_K, the tied embedding's lm_head too, so it is compared with a GGUF quantized with
`llama-quantize --pure` to Q4_K (the default mixtures keep some matrices in q6_K).
llama-bench's tg decodes one sequence from an empty context (64 tokens), so --context 32 matches its mean.

Each decode row also gives the share of the step spent inside ggml's graph compute (the rest is Python:
checks, inputs, the graph lookup, reading the output).

With --from-gguf the engine loads the very GGUF files llama-bench reads (as stored: q8_0, q4_K, bf16)
rather than quantizing the checkpoint at load.

    .venv/bin/python bench/ggml_decode.py [--llamacpp ~/.cache/llama.cpp] [--from-gguf] [--modes int8,int4]
        [--threads 1,2] [--context 32] [--steps 32] [--batch 16] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from bench_common import SHAPES, gguf_file, llamacpp_commit, machine_load, shape_checkpoint, show, spread
from ggml_gemv import llama_bench

from meshllm.step import Segment, StepInput

MODES = {"int8": ("float32", "int8"), "int4": ("float32", "int4"), "bfloat16": ("bfloat16", None)}
GGUF_OF_MODE = {"int8": "q8_0", "int4": "q4_k-pure", "bfloat16": "bf16"}


@dataclass
class Row:
    mode: str
    threads: int
    test: str  # "decode 1", "decode 16"
    tokens_per_s: list[float] = field(default_factory=list)
    compute_share: list[float] = field(default_factory=list)
    llamacpp: list[float] = field(default_factory=list)


class Driver:
    """Decode steps through one stage by hand, from a context made once per sequence."""

    def __init__(self, stage: Any, context: int, batch: int):
        self.stage, self.context = stage, context
        rng = np.random.default_rng(0)
        self.step_id = 0
        self.tokens: dict[int, int] = {}
        for seq_id in range(batch + 1):  # sequence 0 decodes alone, 1..batch together
            prompt = rng.integers(3, stage.config.vocab_size, size=context)
            self.tokens[seq_id] = self.forward([Segment(seq_id, 0, context, sample=True)], prompt)[0]

    def forward(self, segments: list[Segment], token_ids: np.ndarray) -> list[int]:
        self.step_id += 1
        output = self.stage.forward(StepInput(self.step_id, segments, token_ids=np.asarray(token_ids)))
        return [int(t) for t in np.asarray(output.logits).argmax(axis=-1)]

    def decode(self, seq_ids: list[int], steps: int) -> tuple[float, float]:
        """Tokens/s of `steps` decode steps of `seq_ids` from the context (a restart there), and the share
        of that time inside the graph compute."""
        tokens = [self.tokens[s] for s in seq_ids]
        self.forward([Segment(s, self.context, 1, sample=True) for s in seq_ids], np.array(tokens))  # warm
        computed = self.stage.graphs.compute_seconds
        started = time.perf_counter()
        for index in range(steps):
            segments = [Segment(s, self.context + index, 1, sample=True) for s in seq_ids]
            tokens = self.forward(segments, np.array(tokens))
        elapsed = time.perf_counter() - started
        return len(seq_ids) * steps / elapsed, (self.stage.graphs.compute_seconds - computed) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="0.6b", choices=sorted(SHAPES))
    parser.add_argument("--modes", default="int8,int4", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--context", type=int, default=32, help="tokens in each sequence's cache")
    parser.add_argument("--steps", type=int, default=32, help="decode steps a measurement")
    parser.add_argument(
        "--batch", type=int, default=16, help="sequences in the batched decode rows (0: none)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--llamacpp", type=Path, default=None, help="a llama.cpp tree built in DIR/build")
    parser.add_argument(
        "--from-gguf",
        action="store_true",
        help="the engine loads the very GGUF files llama-bench reads (needs --llamacpp), instead of the "
        "checkpoint quantized at load",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    threads = [int(n) for n in args.threads.split(",")]
    modes = [mode for mode in args.modes.split(",") if mode]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        parser.error(f"--modes: {unknown[0]!r} is not one of {', '.join(MODES)}")
    if args.from_gguf and args.llamacpp is None:
        parser.error("--from-gguf needs --llamacpp (llama-quantize makes the quantized GGUFs)")

    from meshllm.engines import load_stage

    spec = SHAPES[args.shape]
    checkpoint = shape_checkpoint(args.shape)
    models = {}
    if args.llamacpp is not None:
        models = {mode: gguf_file(checkpoint, args.llamacpp, GGUF_OF_MODE[mode]) for mode in modes}
    tests = ["decode 1"] + ([f"decode {args.batch}"] if args.batch else [])
    rows = {(m, t, test): Row(m, t, test) for m in modes for t in threads for test in tests}
    load_start = machine_load()
    weight_bytes = {}
    for mode in modes:
        dtype, quantize = MODES[mode]
        if args.from_gguf:  # the file as stored: its types are the mode's
            stage = load_stage("ggml", str(models[mode]), (0, spec.num_hidden_layers), dtype=dtype)
        else:
            stage = load_stage(
                "ggml", str(checkpoint), (0, spec.num_hidden_layers), dtype=dtype, quantize=quantize
            )
        weight_bytes[mode] = stage.weight_bytes()
        driver = Driver(stage, args.context, args.batch)
        for round_ in range(args.rounds):
            for t in threads:
                stage.g.ggml_backend_cpu_set_n_threads(stage.backend, t)
                for test in tests:
                    seq_ids = [0] if test == "decode 1" else list(range(1, args.batch + 1))
                    rate, share = driver.decode(seq_ids, args.steps)
                    rows[mode, t, test].tokens_per_s.append(rate)
                    rows[mode, t, test].compute_share.append(share)
                line = ", ".join(f"{test} {rows[mode, t, test].tokens_per_s[-1]:.1f}" for test in tests)
                if mode in models:
                    rows[mode, t, "decode 1"].llamacpp.append(llama_bench(args.llamacpp, models[mode], t, 64))
                    line += f", llama.cpp {rows[mode, t, 'decode 1'].llamacpp[-1]:.1f}"
                print(f"  round {round_ + 1}: {mode} {t} thread(s): {line} tok/s", file=sys.stderr)
        stage.close()
        del driver, stage
    load_end = machine_load()

    commit = llamacpp_commit(args.llamacpp) if args.llamacpp is not None else None
    print(
        f"checkpoint: qwen3-{args.shape} shape, random weights, {spec.num_hidden_layers} layers, "
        f"vocab {spec.vocab_size}; context {args.context}, {args.steps} steps a measurement, "
        f"{args.rounds} rounds, median (min–max); the engine "
        + ("loads the same GGUF files" if args.from_gguf else "quantizes the checkpoint at load")
    )
    print(f"machine: {load_start} at the start, {load_end.split(', ')[-1]} at the end")
    if commit is not None:
        print(
            f"llama.cpp: {commit} (llama-bench -p 0 -n 64 -r 1, GGUF {', '.join(models[m].name for m in modes)})"
        )
    header = f"{'mode':<8} {'thr':>3}  {'test':<10} {'tok/s':>20}  {'ms/step':>7}  {'compute':>7}"
    print(header + (f"  {'llama.cpp tok/s':>20}  {'ratio':>5}" if commit is not None else ""))
    results = []
    for row in rows.values():
        ours = spread(row.tokens_per_s)
        per_step = 1e3 * (1 if row.test == "decode 1" else args.batch) / ours["median"]
        share = float(np.median(row.compute_share))
        line = f"{row.mode:<8} {row.threads:>3}  {row.test:<10} {show(ours):>20}  {per_step:>7.1f}  {share:>7.0%}"
        theirs = spread(row.llamacpp) if row.llamacpp else None
        if commit is not None:
            ratio = f"{ours['median'] / theirs['median']:>5.2f}" if theirs else f"{'-':>5}"
            line += f"  {show(theirs) if theirs else '-':>20}  {ratio}"
        print(line)
        results.append(
            {
                "mode": row.mode,
                "threads": row.threads,
                "test": row.test,
                "tokens_per_s": ours,
                "samples": row.tokens_per_s,
                "compute_share": share,
                "llamacpp_tokens_per_s": theirs,
                "llamacpp_samples": row.llamacpp,
                "weight_bytes": weight_bytes[row.mode],
            }
        )
    if args.json:
        summary = {
            "bench": "ggml_decode",
            "shape": args.shape,
            "context": args.context,
            "from_gguf": args.from_gguf,
            "llamacpp_commit": commit,
            "load_start": load_start,
            "load_end": load_end,
            "rows": results,
        }
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
