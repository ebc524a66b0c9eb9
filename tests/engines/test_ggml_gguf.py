"""A ggml stage reading a GGUF file: the same logits and greedy tokens as the torch engine on the checkpoint
the file was written from, on all four architectures (a Llama file's reordered q/k rows and its Llama 3
frequency tensor included), splits, quantized files held as stored, and only its own range's tensors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ggml")
pytest.importorskip("gguf")

from meshllm.engines import load_stage  # noqa: E402
from meshllm.errors import ConfigError  # noqa: E402
from meshllm.models.checkpoint import Checkpoint  # noqa: E402
from meshllm.models.gguf import write_gguf  # noqa: E402
from meshllm.models.tiny import ARCHS  # noqa: E402
from meshllm.step import Segment  # noqa: E402
from tests.engines.stage_helpers import greedy_decode, make_prompt, pipeline_logits  # noqa: E402

N_TOKENS = 12
F32_ATOL = 1e-4  # float32 ggml against float32 torch, as in test_ggml_stage.py


@pytest.fixture(scope="module")
def files(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per architecture: (the checkpoint folder, its GGUF in F32, its GGUF in Q8_0)."""
    folder = tmp_path_factory.mktemp("gguf")
    made = {}
    for arch in ARCHS:
        path = tiny_checkpoint(arch)
        made[arch] = (
            path,
            write_gguf(path, folder / f"{arch}-f32.gguf"),
            write_gguf(path, folder / f"{arch}-q8_0.gguf", "Q8_0"),
        )
    return made


@pytest.mark.parametrize("arch", ARCHS)
def test_a_gguf_file_gives_the_torch_engines_logits_and_tokens(arch, files):
    folder, f32, _ = files[arch]
    reference = load_stage("torch", folder, (0, 4))
    prompt = make_prompt(reference.config.vocab_size, 9)
    expected_tokens, expected_logits = greedy_decode([reference], prompt, N_TOKENS)
    stage = load_stage("ggml", f32, (0, 4))
    tokens, logits = greedy_decode([stage], prompt, N_TOKENS)
    np.testing.assert_allclose(logits, expected_logits, atol=F32_ATOL, rtol=0)
    assert tokens == expected_tokens
    # split equivalence: two stages of the file equal the whole
    halves = [load_stage("ggml", f32, (0, 2)), load_stage("ggml", f32, (2, 4))]
    split_tokens, split_logits = greedy_decode(halves, prompt, N_TOKENS)
    np.testing.assert_allclose(split_logits, logits, atol=1e-5, rtol=0)
    assert split_tokens == tokens


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_quantized_file_is_held_as_stored_and_follows_float32(arch, files):
    folder, f32, q8 = files[arch]
    full = load_stage("ggml", f32, (0, 4))
    stage = load_stage("ggml", q8, (0, 4))
    prompt = make_prompt(full.config.vocab_size, 9)
    segment = [Segment(0, 0, len(prompt), sample=True)]
    expected = pipeline_logits([full], segment, prompt)[0]
    logits = pipeline_logits([stage], segment, prompt)[0]
    assert np.corrcoef(logits, expected)[0, 1] > 0.999
    assert int(logits.argmax()) == int(expected.argmax())
    # every matrix as the file holds it: q8_0 is 34 bytes a block of 32 weights, so ~0.27 of float32
    gguf = Checkpoint(q8).gguf
    assert gguf is not None
    assert stage.weight_bytes() == sum(
        tensor.nbytes for tensor in gguf.tensors.values() if tensor.name != "rope_freqs.weight"
    ) + (gguf.tensors["model.embed_tokens.weight"].nbytes if full.config.tie_word_embeddings else 0)
    assert stage.weight_bytes() < full.weight_bytes() * 0.3


def test_a_stage_of_a_gguf_file_holds_only_its_range(files):
    _, f32, q8 = files["qwen3"]
    gguf = Checkpoint(q8).gguf
    assert gguf is not None
    middle = load_stage("ggml", q8, (1, 3))
    names = set(middle.weights.tensors)
    assert {name.split(".")[1] for name in names} == {"1", "2"}
    assert all(name.startswith(("layers.1.", "layers.2.")) for name in names)
    own = [t for name, t in gguf.tensors.items() if name.startswith(("model.layers.1.", "model.layers.2."))]
    assert middle.weight_bytes() == sum(tensor.nbytes for tensor in own)
    last = load_stage("ggml", f32, (3, 4))
    assert {"norm.weight", "lm_head.weight"} <= set(last.weights.tensors)
    assert "embed_tokens.weight" not in last.weights.tensors


def test_a_float_file_is_quantized_at_load_when_asked(files):
    _, f32, _ = files["qwen2"]
    full = load_stage("ggml", f32, (0, 4))
    stage = load_stage("ggml", f32, (0, 4), quantize="int8")
    assert stage.weight_bytes() < full.weight_bytes() * 0.3
    prompt = make_prompt(full.config.vocab_size, 7)
    segment = [Segment(0, 0, len(prompt), sample=True)]
    expected = pipeline_logits([full], segment, prompt)[0]
    assert np.corrcoef(pipeline_logits([stage], segment, prompt)[0], expected)[0, 1] > 0.999


def test_other_engines_refuse_a_gguf_file_naming_the_ggml_engine(files):
    _, f32, _ = files["qwen3"]
    with pytest.raises(ConfigError, match="ggml engine"):
        load_stage("torch", f32, (0, 4))
