"""What the bench scripts share: the checkpoint shapes they measure, llama.cpp's files, a free loopback port."""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from meshllm.models.tiny import TinySpec, make_checkpoint
from meshllm.runtime.local_workers import free_ports

# qwen3-shaped, about 105 MB in float32: big enough that one decode step costs a few milliseconds on a core.
SPEC = TinySpec(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    vocab_size=1024,
)


def health_problem(process: subprocess.Popen, url: str, timeout: float, interval: float = 0.3) -> str | None:
    """Wait until the server at `url` answers /health with 200: None, or why it did not (it exited, or the
    time ran out)."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            return f"the server for {url} exited during start (exit code {process.returncode})"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return None
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            return f"{url} did not become healthy in {timeout:.0f} s"
        time.sleep(interval)


def free_port() -> int:
    return free_ports(1)[0]


# Real model shapes with random weights, stored in bfloat16. Most of what a decode token reads is the
# 151936-row embedding matrix (tied: it is also the lm_head), so the vocabulary keeps its real size.
QWEN3_0_6B = TinySpec(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=40960,
    fill_vocab=True,
)
QWEN3_1_7B = dataclasses.replace(QWEN3_0_6B, hidden_size=2048, intermediate_size=6144)
SHAPES = {"0.6b": QWEN3_0_6B, "1.7b": QWEN3_1_7B}

BENCH_CACHE = Path.home() / ".cache" / "meshllm-bench"  # made checkpoints and GGUFs, kept between runs
GGUF_TYPES = ("bf16", "q8_0", "q4_0")


def parameter_count(spec: TinySpec) -> int:
    """Parameters of a tied qwen3 checkpoint of this shape."""
    hidden, q_size = spec.hidden_size, spec.num_attention_heads * spec.head_dim
    kv_size = spec.num_key_value_heads * spec.head_dim
    attention = hidden * (2 * q_size + 2 * kv_size) + 2 * spec.head_dim
    layer = attention + 3 * hidden * spec.intermediate_size + 2 * hidden
    return spec.vocab_size * hidden + spec.num_hidden_layers * layer + hidden


def shape_checkpoint(shape: str) -> Path:
    """The random-weight bfloat16 checkpoint of `shape` ('0.6b' or '1.7b'), made once under BENCH_CACHE."""
    spec = SHAPES[shape]
    path = BENCH_CACHE / f"qwen3-{shape}-random"
    if (path / "config.json").exists():
        return path
    size = 2 * parameter_count(spec)
    BENCH_CACHE.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(BENCH_CACHE).free
    if free < 3 * size:  # the checkpoint, then its GGUFs
        raise SystemExit(f"{BENCH_CACHE}: {free / 1e9:.1f} GB free, {3 * size / 1e9:.1f} GB needed")
    print(f"making {path} ({size / 1e9:.2f} GB of random weights, once)", file=sys.stderr)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    make_checkpoint(partial, arch="qwen3", spec=spec, dtype="bfloat16")
    partial.rename(path)
    return path


def llamacpp_commit(llamacpp: Path) -> str:
    """The commit of a llama.cpp checkout; for a tree exported without git, what its COMMIT file says."""
    command = ["git", "-C", str(llamacpp), "log", "-1", "--format=%h"]
    found = subprocess.run(command, capture_output=True, text=True)
    if found.returncode == 0 and found.stdout.strip():
        return found.stdout.strip()
    marker = llamacpp / "COMMIT"
    return marker.read_text().strip() if marker.exists() else "unknown (no git checkout, no COMMIT file)"


def llamacpp_binary(llamacpp: Path, name: str) -> Path:
    binary = llamacpp / "build" / "bin" / name
    if not binary.exists():
        raise SystemExit(f"{binary} not found: build llama.cpp in {llamacpp}/build first")
    return binary


def gguf_file(checkpoint: Path, llamacpp: Path, kind: str) -> Path:
    """A GGUF of `checkpoint` in `kind` (bf16, q8_0, q4_0, q4_k, ...), made once next to it: bf16 by
    `meshllm.models.gguf.write_gguf` (as bench/make_gguf.py), the others from that by llama-quantize. A
    `-pure` kind (`q4_k-pure`) holds every matrix in that type (llama-quantize --pure), the tied embedding
    too, where the default mixtures keep some in q6_K."""
    path = checkpoint.with_name(f"{checkpoint.name}-{kind}.gguf")
    if path.exists():
        return path
    if kind == "bf16":
        from meshllm.models.gguf import write_gguf

        partial = path.with_name(path.name + ".partial")
        write_gguf(checkpoint, partial, "BF16")
        partial.rename(path)
        return path
    source = gguf_file(checkpoint, llamacpp, "bf16")
    partial = path.with_name(path.name + ".partial")
    base, _, variant = kind.partition("-")
    command = [str(llamacpp_binary(llamacpp, "llama-quantize"))] + (["--pure"] if variant == "pure" else [])
    command += [str(source), str(partial), base.upper(), "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"llama-quantize to {kind} failed:\n{done.stderr[-2000:]}")
    partial.rename(path)
    return path


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def show(figures: dict[str, float], digits: int = 1) -> str:
    """'12.3 (11.9–12.8)': the median and the range of a `spread`."""
    return f"{figures['median']:.{digits}f} ({figures['min']:.{digits}f}–{figures['max']:.{digits}f})"


def machine_load() -> str:
    """The cores and the 1-minute load average: on a shared machine, figures depend on both."""
    return f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
