"""Memory a stage holds: each process loads only its own layers, so its share shrinks with the split.

For K = 1, 2 and 4 equal stages of one checkpoint, loads each stage in a fresh process and prints the
stage's parameter bytes and the process's resident memory growth (RSS after loading and reading every weight, minus before).

    .venv/bin/python bench/memory_per_stage.py [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from meshllm.models.plan import plan_layers
from meshllm.models.tiny import TinySpec, make_checkpoint

SPEC = TinySpec(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    vocab_size=1024,
)

_CHILD = """
import json, sys
from meshllm.engines.torch import load_stage

def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))

before = rss()
stage = load_stage(sys.argv[1], (int(sys.argv[2]), int(sys.argv[3])))
touched = sum(float(p.sum()) for p in stage.model.parameters())  # fault every weight page in
print(json.dumps({"weight_bytes": stage.weight_bytes(), "rss_growth_bytes": rss() - before}))
"""


def measure(path: Path, layer_range: tuple[int, int]) -> dict[str, int]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", _CHILD, str(path), str(layer_range[0]), str(layer_range[1])]
    output = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as folder:
        path = make_checkpoint(Path(folder) / "bench", arch="llama", spec=SPEC)
        total = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        print(
            f"checkpoint: llama-shaped, {SPEC.num_hidden_layers} layers, {total / 1e6:.0f} MB of safetensors"
        )
        print(f"{'stages':>6}  {'stage':>5}  {'layers':>8}  {'weights MB':>10}  {'RSS growth MB':>13}")
        for n_stages in (1, 2, 4):
            rows = []
            for index, layer_range in enumerate(plan_layers(SPEC.num_hidden_layers, [1.0] * n_stages)):
                figures = measure(path, layer_range)
                rows.append({"layers": list(layer_range), **figures})
                print(
                    f"{n_stages:>6}  {index:>5}  {str(list(layer_range)):>8}  "
                    f"{figures['weight_bytes'] / 1e6:>10.1f}  {figures['rss_growth_bytes'] / 1e6:>13.1f}"
                )
            results[str(n_stages)] = rows
    if args.json:
        print(json.dumps({"checkpoint_bytes": total, "stages": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
