"""A stage's share of a checkpoint: only its tensors, bytes as stored, loading to the same stage."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from meshllm.engines.torch import load_stage
from meshllm.errors import ConfigError
from meshllm.models.checkpoint import Checkpoint
from meshllm.models.share import content_key, plan_share, share_bytes
from meshllm.step import LayerRange, Segment, StepInput


def write_share(checkpoint: Path, layer_range: LayerRange, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for file in plan_share(Checkpoint.open(checkpoint), layer_range):
        with open(folder / file.name, "wb") as handle:
            for chunk in file.chunks(chunk_bytes=1000):  # small chunks: tensors cross chunk borders
                handle.write(chunk)
        assert (folder / file.name).stat().st_size == file.size
    return folder


def tensor_names(folder: Path) -> set[str]:
    names: set[str] = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="numpy") as handle:
            names |= set(handle.keys())
    return names


@pytest.mark.parametrize("shards", [1, 3])
def test_a_middle_share_holds_its_layers_only_and_loads_the_same_stage(
    shards: int, tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    source = tiny_checkpoint("qwen3", shards=shards)
    share = write_share(source, LayerRange(1, 3), tmp_path / "share")
    assert {name.split(".")[2] for name in tensor_names(share)} == {"1", "2"}
    assert sorted(p.name for p in share.glob("*.safetensors")) == [
        "layer-00001.safetensors",
        "layer-00002.safetensors",
    ]
    assert (share / "config.json").read_bytes() == (source / "config.json").read_bytes()
    assert not (share / "model.safetensors.index.json").exists()
    hidden = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    step = StepInput(0, [Segment(1, 0, 5)], hidden_states=hidden)
    expected = load_stage(str(source), (1, 3)).forward(step).hidden_states
    np.testing.assert_array_equal(load_stage(str(share), (1, 3)).forward(step).hidden_states, expected)


def test_the_last_share_of_tied_embeddings_carries_the_embedding_and_the_head(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    source = tiny_checkpoint("qwen3")  # qwen3's tiny checkpoint ties its embeddings
    assert json.loads((source / "config.json").read_text())["tie_word_embeddings"]
    share = write_share(source, LayerRange(3, 4), tmp_path / "share")
    names = tensor_names(share)
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names
    assert not any(name.startswith("model.layers.2.") for name in names)
    tokens = np.array([5, 17, 42])
    whole = load_stage(str(source), (0, 4)).forward(
        StepInput(0, [Segment(1, 0, 3, sample=True)], token_ids=tokens)
    )
    first = load_stage(str(source), (0, 3)).forward(StepInput(0, [Segment(1, 0, 3)], token_ids=tokens))
    last = load_stage(str(share), (3, 4)).forward(
        StepInput(0, [Segment(1, 0, 3, sample=True)], hidden_states=first.hidden_states)
    )
    np.testing.assert_array_equal(last.logits, whole.logits)


def test_share_bytes_are_about_the_range_s_part_of_the_weights(tiny_checkpoint: Callable[..., Path]) -> None:
    checkpoint = Checkpoint.open(tiny_checkpoint("qwen3", layers=8))
    assert share_bytes(checkpoint, LayerRange(4, 5)) == share_bytes(checkpoint, LayerRange(5, 6))
    halves = share_bytes(checkpoint, LayerRange(2, 4)), share_bytes(checkpoint, LayerRange(4, 6))
    assert halves[0] == halves[1]


def test_a_range_outside_the_model_is_refused(tiny_checkpoint: Callable[..., Path]) -> None:
    with pytest.raises(ConfigError, match=r"not within the checkpoint's 4 layers"):
        plan_share(Checkpoint.open(tiny_checkpoint("qwen3")), LayerRange(2, 9))


def test_the_content_key_follows_the_tensor_values_not_the_folder(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHLLM_CACHE", str(tmp_path / "cache"))
    source = tiny_checkpoint("qwen3")
    key = content_key(Checkpoint.open(source))
    assert len(key) == 64 and (tmp_path / "cache" / "file-hashes.json").exists()
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in source.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    assert content_key(Checkpoint.open(copy)) == key
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor: same header, other content
    weights.write_bytes(bytes(data))
    assert content_key(Checkpoint.open(copy)) != key


def test_the_share_of_a_gguf_model_is_one_gguf_file_of_its_range(tiny_checkpoint, tmp_path) -> None:
    pytest.importorskip("gguf")
    from meshllm.models.gguf import write_gguf
    from meshllm.models.share import GgufShareFile, plan_share

    for arch, tied in (("qwen3", True), ("qwen2", False)):
        model = write_gguf(tiny_checkpoint(arch), tmp_path / f"{arch}.gguf", "Q8_0")
        whole = Checkpoint.open(model)
        for layer_range in (LayerRange(0, 2), LayerRange(1, 3), LayerRange(3, 4)):
            [share] = plan_share(whole, layer_range)
            assert isinstance(share, GgufShareFile) and share.name == "model.gguf"
            folder = tmp_path / f"{arch}-{layer_range.start}-{layer_range.end}"
            folder.mkdir()
            (folder / share.name).write_bytes(b"".join(share.chunks(chunk_bytes=1000)))
            assert (folder / share.name).stat().st_size == share.size
            part = Checkpoint.open(folder)  # a folder of one GGUF file is that file
            assert part.gguf is not None and whole.gguf is not None
            assert part.config == whole.config and part.config.tie_word_embeddings is tied
            expected = [name for name in whole.gguf.tensors if name not in ("rope_freqs.weight",)]
            expected = [
                name
                for name in expected
                if (
                    name.startswith("model.layers.")
                    and layer_range.start <= int(name.split(".")[2]) < layer_range.end
                )
                or (
                    name == "model.embed_tokens.weight"
                    and (layer_range.start == 0 or (layer_range.end == 4 and tied))
                )
                or (name in ("model.norm.weight", "lm_head.weight") and layer_range.end == 4)
            ]
            assert sorted(part.weight_map) == sorted(expected)
            for name in expected:
                assert np.array_equal(part.gguf.tensors[name].data, whole.gguf.tensors[name].data), name
            assert share.size < model.stat().st_size
