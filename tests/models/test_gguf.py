"""GGUF files as models: the config from the file's keys, the tokenizer and chat template from its
vocabulary, Hugging Face names for its tensors, and clear errors for files meshllm cannot read."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("gguf")

from meshllm.errors import ConfigError  # noqa: E402
from meshllm.models.checkpoint import Checkpoint, resolve_model  # noqa: E402
from meshllm.models.gguf import gguf_name, hf_name, write_gguf  # noqa: E402
from meshllm.models.plan import make_plan, tensor_bytes  # noqa: E402
from meshllm.models.tiny import ARCHS  # noqa: E402
from meshllm.models.tokenizer import chat_prompt_ids, load_tokenizer  # noqa: E402

SAME_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "qk_norm",
    "bos_token_id",
    "eos_token_id",
)
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello! What is 2048 + 42? Tell me about Paris,\n\n  the river and the sea."},
]


@pytest.mark.parametrize("arch", ARCHS)
def test_config_and_tokenizer_match_the_checkpoint(arch, tiny_checkpoint: Callable[..., Path], tmp_path):
    folder = tiny_checkpoint(arch)
    path = write_gguf(folder, tmp_path / f"{arch}.gguf")
    gguf_checkpoint, hf_checkpoint = Checkpoint.open(path), Checkpoint.open(folder)
    for field in SAME_FIELDS:
        assert getattr(gguf_checkpoint.config, field) == getattr(hf_checkpoint.config, field), field
    # a Mistral model is converted as 'llama', as llama.cpp's converter does
    assert gguf_checkpoint.config.model_type == ("llama" if arch == "mistral" else arch)
    tokenizer, expected = load_tokenizer(path), load_tokenizer(folder)
    ids = chat_prompt_ids(tokenizer, MESSAGES)
    assert ids == chat_prompt_ids(expected, MESSAGES)
    assert tokenizer.decode(ids) == expected.decode(ids)
    assert tokenizer.eos_token_id == expected.eos_token_id


def test_tensors_are_known_by_their_hugging_face_names(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint("qwen2")
    checkpoint = Checkpoint.open(write_gguf(folder, tmp_path / "qwen2.gguf", "Q8_0"))
    assert set(checkpoint.weight_map) == set(Checkpoint.open(folder).weight_map)
    assert gguf_name("model.layers.3.self_attn.q_proj.bias") == "blk.3.attn_q.bias"
    assert hf_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    # sizes as stored: q8_0 is 34 bytes per 32 weights
    sizes = tensor_bytes(checkpoint, "float32")
    assert sizes["model.layers.0.mlp.up_proj.weight"] == 128 * 64 // 32 * 34
    plan = make_plan(checkpoint, [("a", 10**9), ("b", 10**9)], "float32")
    assert [stage.layer_range for stage in plan][-1].end == 4
    # calibrated in the type its matrices are stored in
    assert checkpoint.gguf is not None and checkpoint.gguf.stored_quantize() == "int8"
    float_file = Checkpoint.open(write_gguf(folder, tmp_path / "qwen2-f32.gguf"))
    assert float_file.gguf is not None and float_file.gguf.stored_quantize() is None


def test_files_meshllm_cannot_read_are_named(tmp_path):
    import gguf

    not_gguf = tmp_path / "broken.gguf"
    not_gguf.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match="not a readable GGUF file"):
        _ = Checkpoint.open(not_gguf).config
    other = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(other), "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match="architecture 'gpt2' is not supported"):
        _ = Checkpoint.open(other).config
    text = tmp_path / "model.bin"
    text.write_bytes(b"x")
    with pytest.raises(ConfigError, match="a .gguf file"):
        resolve_model(str(text))
