"""The last stage's sampler: what choosing the next token of many sequences costs at a real vocabulary.

Times `Sampler.sample` (meshllm/runtime/sampling.py, numpy on the CPU) for --sequences sequences at once,
each a row of --vocab logits shaped like a trained model's (a normal spread, and a few hundred likely
tokens well above it), under greedy decoding, temperature 1, top_p 0.9 and top_k 40 with top_p 0.95.
Prints the median milliseconds of one step and of one token per setting over --repeats steps.

    .venv/bin/python bench/sampler.py [--vocab 151936] [--sequences 16] [--repeats 15] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from meshllm.runtime.sampling import Sampler
from meshllm.step import SamplingParams, Segment

SETTINGS = {
    "greedy": SamplingParams(temperature=0.0),
    "temperature 1": SamplingParams(temperature=1.0, seed=0),
    "top_p 0.9": SamplingParams(temperature=0.7, top_p=0.9, seed=0),
    "top_k 40, top_p 0.95": SamplingParams(temperature=0.7, top_k=40, top_p=0.95, seed=0),
}


def logits(sequences: int, vocab: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((sequences, vocab)) * 2.0).astype(np.float32)
    head = min(200, vocab)
    rows[:, :head] += rng.uniform(4.0, 12.0, (sequences, head)).astype(np.float32)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=151936, help="logits a row (Qwen3's vocabulary)")
    parser.add_argument("--sequences", type=int, default=16, help="sequences sampled in one step")
    parser.add_argument("--repeats", type=int, default=15, help="steps timed per setting")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    rows = logits(args.sequences, args.vocab)
    figures: dict[str, dict[str, float]] = {}
    print(f"{args.sequences} sequences, {args.vocab} logits each, median of {args.repeats} steps")
    print(f"{'setting':<22} {'ms a step':>10} {'ms a token':>11}")
    for name, params in SETTINGS.items():
        sampler = Sampler()
        segments = [Segment(i, 0, 1, sample=True, sampling=params) for i in range(args.sequences)]
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            sampler.sample(segments, rows)
            times.append(time.perf_counter() - started)
        step = statistics.median(times) * 1000
        figures[name] = {"ms_per_step": step, "ms_per_token": step / args.sequences}
        print(f"{name:<22} {step:>10.2f} {step / args.sequences:>11.3f}")
    if args.json:
        print(json.dumps({"vocab": args.vocab, "sequences": args.sequences, "settings": figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
