"""How fast a worker without the model receives its share over the cluster, against a plain file copy.

A `meshllm worker` process on loopback loads the second half of a Qwen3-0.6B-shaped bfloat16 checkpoint
(layers [14, 28), and the tied embedding as its lm_head) from this process's Weights service into an
empty cache; then it loads the same range again (a restart that keeps its range: 0 bytes). The copy
baseline writes the same share files from the same source bytes with plain reads and writes, no gRPC.

    .venv/bin/python bench/weights_transfer.py            # 0.6b shape (about 1.5 GB made once)
    .venv/bin/python bench/weights_transfer.py --shape small
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import SPEC, free_port, machine_load, shape_checkpoint  # noqa: E402

from meshllm.models.checkpoint import Checkpoint  # noqa: E402
from meshllm.models.share import plan_share  # noqa: E402
from meshllm.models.tiny import make_checkpoint  # noqa: E402
from meshllm.runtime.local_workers import LocalWorkers  # noqa: E402
from meshllm.runtime.weights import CheckpointWeights  # noqa: E402
from meshllm.step import LayerRange  # noqa: E402
from meshllm.transport.stage import LoadSpec, WeightsFrom  # noqa: E402
from meshllm.transport.stage_client import StageClient  # noqa: E402
from meshllm.transport.weights import WeightsServer  # noqa: E402

TOKEN = "bench-weights"
RECEIVED = re.compile(r"(\d+) bytes received \(.*?, (\d+) files, ([\d.]+) s, (\d+) MB/s\)")


def copy_share(checkpoint: Checkpoint, layer_range: LayerRange, folder: Path) -> tuple[int, float]:
    """(bytes, seconds) of writing the share's files from the source with plain reads and writes."""
    started = time.perf_counter()
    total = 0
    for file in plan_share(checkpoint, layer_range):
        with open(folder / file.name, "wb") as handle:
            for chunk in file.chunks():
                handle.write(chunk)
                total += len(chunk)
    return total, time.perf_counter() - started


async def load_twice(checkpoint: Checkpoint, layer_range: LayerRange, cache: Path) -> dict[str, object]:
    started = time.perf_counter()
    source = CheckpointWeights(checkpoint)
    key_seconds = time.perf_counter() - started
    server = WeightsServer(source, f"127.0.0.1:{free_port()}", TOKEN, "bench")
    await server.start()
    workers = LocalWorkers()
    port = free_port()
    workers.start("bench-worker", port, TOKEN, threads=1, env={"MESHLLM_WEIGHTS_CACHE": str(cache)})
    client = StageClient("bench-worker", f"127.0.0.1:{port}", TOKEN)
    try:
        await workers.wait_healthy(TOKEN)
        spec = LoadSpec(
            str(checkpoint.path), layer_range, "bfloat16", weights=WeightsFrom(server.address, source.key)
        )
        loads = []
        for _ in range(2):
            began = time.perf_counter()
            summary = await client.load(spec, "", lambda update: None)
            loads.append((summary, time.perf_counter() - began))
    finally:
        await client.close()
        workers.stop()
        await server.stop()
    figures: dict[str, object] = {"content_key_s": round(key_seconds, 2)}
    for label, (summary, seconds) in zip(("first", "second"), loads, strict=True):
        found = RECEIVED.search(summary)
        assert found, summary
        figures[label] = {
            "bytes_received": int(found.group(1)),
            "files_received": int(found.group(2)),
            "transfer_s": float(found.group(3)),
            "transfer_MB_per_s": int(found.group(4)),
            "load_s_in_all": round(seconds, 2),
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("0.6b", "small"), default="0.6b")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshllm-weights-bench-") as folder:
        root = Path(folder)
        if args.shape == "0.6b":
            path = shape_checkpoint("0.6b")
        else:
            path = make_checkpoint(root / "model", spec=SPEC, dtype="bfloat16")
        checkpoint = Checkpoint.open(path)
        layers = checkpoint.config.num_hidden_layers
        layer_range = LayerRange(layers // 2, layers)
        (root / "copy").mkdir()
        copied, copy_seconds = copy_share(checkpoint, layer_range, root / "copy")
        figures = asyncio.run(load_twice(checkpoint, layer_range, root / "cache"))
    result = {
        "shape": args.shape,
        "layers": str(layer_range),
        "share_MB": round(copied / 1e6, 1),
        "plain_copy_s": round(copy_seconds, 2),
        "plain_copy_MB_per_s": round(copied / copy_seconds / 1e6),
        **figures,
        "machine": machine_load(),
    }
    if args.json:
        print(json.dumps(result))
        return
    first, second = figures["first"], figures["second"]
    assert isinstance(first, dict) and isinstance(second, dict)
    print(f"share of layers {layer_range}: {copied / 1e6:.1f} MB ({machine_load()})")
    print(f"plain copy of the same bytes: {copy_seconds:.2f} s, {copied / copy_seconds / 1e6:.0f} MB/s")
    print(
        f"first start: {first['bytes_received']} bytes received in {first['transfer_s']} s, "
        f"{first['transfer_MB_per_s']} MB/s ({first['load_s_in_all']} s with the load)"
    )
    print(
        f"second start: {second['bytes_received']} bytes received; the cache checked in "
        f"{second['transfer_s']} s ({second['load_s_in_all']} s with the load)"
    )


if __name__ == "__main__":
    main()
