"""A GGUF of a checkpoint made by `meshllm.models.tiny` (the benchmarks' random-weight shapes), for
llama.cpp and for meshllm's ggml engine to load: `meshllm.models.gguf.write_gguf`, as llama.cpp's own
converter lays the file out (tensor names, hyperparameters, a "gpt2"-style BPE vocabulary with its merges,
the chat template). The converter itself cannot be used on these checkpoints: it identifies a BPE
pre-tokenizer by hashing its output on a test text, and a tokenizer trained here matches no known hash.
Matrices go in --type (bf16 by default, the checkpoint's own), norms in float32; tied embeddings give no
`output.weight` (llama.cpp then reads `token_embd.weight` as the lm_head).

    .venv/bin/python bench/make_gguf.py CHECKPOINT_DIR OUT.gguf [--type bf16|f16|f32|q8_0|q4_0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from meshllm.models.gguf import write_gguf


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="folder made by meshllm.models.tiny.make_checkpoint")
    parser.add_argument("out", type=Path, help="the .gguf file to write")
    parser.add_argument("--type", default="bf16", help="ggml type of the matrices (default bf16)")
    args = parser.parse_args()
    partial = args.out.with_name(args.out.name + ".partial")
    write_gguf(args.checkpoint, partial, args.type)
    partial.rename(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e9:.2f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
