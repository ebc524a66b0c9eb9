"""The Weights service over real gRPC on 127.0.0.1: the token, the checkpoint key and the range are checked,
and a fetched file carries the sha256 of exactly its bytes."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from meshllm.errors import StageError
from meshllm.models.checkpoint import Checkpoint
from meshllm.runtime.weights import CheckpointWeights, FetchReport, WeightCache
from meshllm.step import LayerRange
from meshllm.transport.weights import WeightsClient, WeightsServer
from tests.conftest import free_port

TOKEN = "a-token"


def with_server(checkpoint: Path, calls: Callable[[str, str], object]) -> object:
    """Run the blocking `calls(address, key)` against a Weights server serving `checkpoint`."""

    async def run() -> object:
        source = CheckpointWeights(Checkpoint.open(checkpoint))
        server = WeightsServer(source, f"127.0.0.1:{free_port()}", TOKEN, "coordinator")
        await server.start()
        try:
            return await asyncio.to_thread(calls, server.address, source.key)
        finally:
            await server.stop()

    return asyncio.run(run())


def test_a_fetched_file_comes_whole_with_its_sha256(tiny_checkpoint: Callable[..., Path]) -> None:
    def calls(address: str, key: str) -> tuple[list, list[tuple[int, str, str]]]:
        client = WeightsClient(address, TOKEN, key)
        entries = client.share(LayerRange(2, 4))
        fetched = []
        for entry in entries:
            parts: list[bytes] = []
            sha256 = client.fetch(LayerRange(2, 4), entry.name, parts.append)
            data = b"".join(parts)
            fetched.append((len(data) - entry.size, sha256, hashlib.sha256(data).hexdigest()))
        client.close()
        return entries, fetched

    entries, fetched = with_server(tiny_checkpoint("qwen3"), calls)  # type: ignore[misc]
    names = [entry.name for entry in entries]
    assert "config.json" in names and "head.safetensors" in names and "embed.safetensors" in names
    assert "layer-00001.safetensors" not in names and "layer-00003.safetensors" in names
    assert all(extra == 0 and sent == computed for extra, sent, computed in fetched)


@pytest.mark.parametrize(
    ("token", "key", "layers", "message"),
    [
        (None, None, (0, 2), "coordinator: the call carried no cluster token"),
        ("wrong", None, (0, 2), "coordinator: the call carried a wrong cluster token"),
        (TOKEN, "f" * 64, (0, 2), "coordinator serves checkpoint .*, not ffffffffffff"),
        (TOKEN, None, (2, 9), r"layers \[2, 9\) are not within the checkpoint's 4 layers"),
    ],
)
def test_a_call_without_the_token_for_another_checkpoint_or_range_is_refused_by_name(
    token: str | None,
    key: str | None,
    layers: tuple[int, int],
    message: str,
    tiny_checkpoint: Callable[..., Path],
) -> None:
    def calls(address: str, served_key: str) -> str:
        client = WeightsClient(address, token, key or served_key)
        try:
            client.share(LayerRange(*layers))
        except StageError as error:
            return str(error)
        finally:
            client.close()
        return "no error"

    error = with_server(tiny_checkpoint("qwen3"), calls)
    assert isinstance(error, str)
    assert re.search(message, error), error


def test_an_unreachable_weights_service_is_named_with_the_fix() -> None:
    client = WeightsClient(f"127.0.0.1:{free_port()}", TOKEN, "0" * 64)
    with pytest.raises(
        StageError, match=r"the weights at 127\.0\.0\.1:\d+ are unreachable .*coordinator's weights port"
    ):
        client.share(LayerRange(0, 1), timeout=5)
    client.close()


def test_a_re_plan_fetches_only_the_layers_it_gains(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    cache = WeightCache(tmp_path / "cache")

    def calls(address: str, key: str) -> list[FetchReport]:
        client = WeightsClient(address, TOKEN, key)
        try:
            return [cache.take(client, LayerRange(1, 3)), cache.take(client, LayerRange(2, 4))]
        finally:
            client.close()

    first, second = with_server(tiny_checkpoint("qwen3"), calls)  # type: ignore[misc]
    layer = (first.folder / "layer-00002.safetensors").stat().st_size
    gained = sum(
        (second.folder / name).stat().st_size
        for name in ("layer-00003.safetensors", "head.safetensors", "embed.safetensors")
    )
    assert second.bytes_received == gained  # layer 2 and the small files came from the first range's folder
    assert second.files_received == 3 and layer > 0  # layer 3, the head, the tied embedding
    assert (second.folder / "layer-00002.safetensors").stat().st_ino == (
        first.folder / "layer-00002.safetensors"
    ).stat().st_ino
