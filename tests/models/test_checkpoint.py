"""Finding and reading checkpoints: bad input fails with one line that names the file or field at fault."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load_file, save_file

from meshllm.engines.torch.stage import load_stage
from meshllm.errors import ConfigError
from meshllm.models import tiny
from meshllm.models.checkpoint import Checkpoint, resolve_model
from meshllm.models.config import ModelConfig

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def config_error(call: Callable[[], Any]) -> str:
    """The message of the ConfigError `call` raises, checked to be one line."""
    with pytest.raises(ConfigError) as raised:
        call()
    message = str(raised.value)
    assert message and "\n" not in message
    return message


def copy_checkpoint(source: Path, destination: Path) -> Path:
    return Path(shutil.copytree(source, destination))


def edit_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def base_config(**changes: Any) -> dict[str, Any]:
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 100,
    }
    config.update(changes)
    return config


def test_folder_without_config_json_is_refused(tmp_path: Path) -> None:
    message = config_error(lambda: Checkpoint.open(tmp_path))

    assert str(tmp_path) in message and "config.json" in message


def test_unsupported_model_type_is_refused(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    path = copy_checkpoint(tiny_checkpoint(), tmp_path / "gpt2")
    edit_config(path, model_type="gpt2")

    message = config_error(lambda: Checkpoint.open(path))

    assert str(path / "config.json") in message and "'gpt2'" in message


@pytest.mark.parametrize("value", ["64", 64.5, None, True, -64])
def test_hidden_size_that_is_no_positive_integer_is_refused(
    value: Any, tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    path = copy_checkpoint(tiny_checkpoint(), tmp_path / "bad")
    edit_config(path, hidden_size=value)

    message = config_error(lambda: Checkpoint.open(path))

    assert str(path / "config.json") in message and "hidden_size" in message


def test_config_json_that_is_no_json_is_refused(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    path = copy_checkpoint(tiny_checkpoint(), tmp_path / "broken")
    (path / "config.json").write_text("{not json")

    message = config_error(lambda: Checkpoint.open(path))

    assert str(path / "config.json") in message


@pytest.mark.parametrize("layer_range", [(2, 5), (-1, 2), (3, 3), (3, 1)])
def test_layer_range_out_of_bounds_is_refused(
    layer_range: tuple[int, int], tiny_checkpoint: Callable[..., Path]
) -> None:
    message = config_error(lambda: load_stage(tiny_checkpoint(), layer_range))

    assert f"[{layer_range[0]}, {layer_range[1]})" in message and "4 layers" in message


def remove_tensor(path: Path, name: str) -> None:
    """Rewrite the checkpoint's one safetensors file without the tensor `name`."""
    tensors = load_file(path / "model.safetensors")
    del tensors[name]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("arch", "name", "layer_range"),
    [
        ("qwen3", "model.layers.1.mlp.up_proj.weight", (0, 4)),
        ("qwen2", "model.layers.3.self_attn.q_proj.bias", (2, 4)),
        ("llama", "model.norm.weight", (2, 4)),
        ("llama", "lm_head.weight", (2, 4)),
        ("qwen3", "model.embed_tokens.weight", (2, 4)),  # tied: the last stage's lm_head
    ],
)
def test_missing_tensor_is_named(
    arch: str, name: str, layer_range: tuple[int, int], tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    path = copy_checkpoint(tiny_checkpoint(arch=arch), tmp_path / "incomplete")
    remove_tensor(path, name)

    message = config_error(lambda: load_stage(path, layer_range))

    assert str(path) in message and repr(name) in message


def test_stage_that_does_not_need_the_missing_tensor_loads(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    path = copy_checkpoint(tiny_checkpoint(), tmp_path / "incomplete")
    remove_tensor(path, "model.layers.1.mlp.up_proj.weight")

    assert load_stage(path, (2, 4)).layer_range == (2, 4)


def test_shard_listed_in_the_index_but_missing_is_named(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    path = copy_checkpoint(tiny_checkpoint(shards=3), tmp_path / "sharded")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    missing_file = index["weight_map"]["model.norm.weight"]
    (path / missing_file).unlink()

    message = config_error(lambda: load_stage(path, (0, 4)))

    assert missing_file in message


def test_hub_id_while_offline_says_to_pass_a_local_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    # huggingface_hub reads its environment once, at import: set both the variables and its constants.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))

    message = config_error(lambda: resolve_model("meshllm-test/no-such-model"))

    assert "meshllm-test/no-such-model" in message and "local" in message


def test_path_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    message = config_error(lambda: resolve_model(str(tmp_path / "nowhere")))

    assert str(tmp_path / "nowhere") in message


def test_top_level_rope_theta_and_rope_scaling_parse() -> None:
    config = ModelConfig.from_dict(base_config(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING))

    assert config.rope_theta == 500000.0
    assert config.rope_scaling == LLAMA3_SCALING


def test_rope_parameters_parse_like_the_top_level_keys() -> None:
    top_level = ModelConfig.from_dict(base_config(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING))
    nested = ModelConfig.from_dict(base_config(rope_parameters={**LLAMA3_SCALING, "rope_theta": 500000.0}))

    assert nested == top_level


def test_default_rope_parameters_mean_no_scaling() -> None:
    config = ModelConfig.from_dict(
        base_config(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    )

    assert config.rope_theta == 1000000.0
    assert config.rope_scaling is None


def test_config_written_by_transformers_parses() -> None:
    from transformers import LlamaConfig

    written = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        rope_theta=500000.0,
        rope_scaling=LLAMA3_SCALING,
    ).to_dict()

    config = ModelConfig.from_dict(written)

    assert config.rope_theta == 500000.0
    assert config.rope_scaling is not None and config.rope_scaling["factor"] == 8.0
    assert (config.num_key_value_heads, config.head_dim) == (2, 16)


def test_demo_checkpoint_is_made_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLLM_CACHE", str(tmp_path))
    made: list[Path] = []
    make_checkpoint = tiny.make_checkpoint

    def counting_make_checkpoint(path: Path, *args: Any, **kwargs: Any) -> Path:
        made.append(Path(path))
        return make_checkpoint(path, *args, **kwargs)

    monkeypatch.setattr(tiny, "make_checkpoint", counting_make_checkpoint)

    first, second = resolve_model("demo"), resolve_model("demo")

    assert first == second and first.parent == tmp_path
    assert len(made) == 1
    assert Checkpoint.open("demo").config.model_type == "qwen3"
    assert [child.name for child in tmp_path.iterdir()] == [first.name]  # no partial folder left


@pytest.mark.parametrize(
    ("keys", "own"),
    [
        ({"torch_dtype": "bfloat16"}, "bfloat16"),
        ({"torch_dtype": "float16"}, "float16"),
        ({"torch_dtype": None, "dtype": "bfloat16"}, "bfloat16"),  # as transformers 5 writes it
        ({"torch_dtype": "float32"}, "float32"),
        ({"torch_dtype": None}, "float32"),
        ({"torch_dtype": "int8"}, "float32"),  # no dtype of a stage: the safe one
    ],
)
def test_a_model_s_own_dtype_is_the_one_its_config_names(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path, keys: dict[str, Any], own: str
) -> None:
    path = copy_checkpoint(tiny_checkpoint(), tmp_path / "model")
    edit_config(path, **keys)
    checkpoint = Checkpoint.open(path)
    assert checkpoint.own_dtype == own
    assert checkpoint.served_dtype("auto") == checkpoint.served_dtype(None) == own
    assert checkpoint.served_dtype("float16") == "float16"


def test_a_gguf_file_s_own_dtype_is_float32(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    from meshllm.models.gguf import write_gguf

    assert (
        Checkpoint.open(write_gguf(tiny_checkpoint(), tmp_path / "model.gguf", "BF16")).own_dtype == "float32"
    )
