"""An MLX stage: equality with mlx-lm and with the torch engine, splits, mixed steps, only its own tensors."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

import torch  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from safetensors import safe_open  # noqa: E402

from meshllm.engines import load_stage  # noqa: E402
from meshllm.engines.mlx import MlxStage  # noqa: E402
from meshllm.errors import ConfigError, StageError  # noqa: E402
from meshllm.models.checkpoint import Checkpoint  # noqa: E402
from meshllm.models.tiny import ARCHS  # noqa: E402
from meshllm.step import Segment, StepInput  # noqa: E402
from tests.engines.stage_helpers import greedy_decode, make_prompt, mlx_lm_greedy, pipeline_logits  # noqa: E402

N_TOKENS = 16  # greedy tokens compared per checkpoint


def parameter_names(stage: MlxStage) -> set[str]:
    return {name for name, _ in tree_flatten(stage.model.parameters())}


def checkpoint_tensor_bytes(path: Path, names: set[str]) -> int:
    checkpoint = Checkpoint.open(path)
    total = 0
    for name in names:
        with safe_open(checkpoint.weight_map[name], framework="numpy") as handle:
            total += handle.get_tensor(name).nbytes
    return total


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint: Callable[..., Path]) -> dict[str, Path]:
    return {arch: tiny_checkpoint(arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def whole_stages(checkpoints: dict[str, Path]) -> dict[str, MlxStage]:
    return {arch: load_stage("mlx", path, (0, 4)) for arch, path in checkpoints.items()}


def vocab_size(stage: Any) -> int:
    return stage.config.vocab_size


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_greedy_tokens_equal_mlx_lm(arch, checkpoints, whole_stages):
    stage = whole_stages[arch]
    prompt = make_prompt(vocab_size(stage), 9)
    tokens, logits = greedy_decode([stage], prompt, N_TOKENS)
    expected_tokens, expected_logits = mlx_lm_greedy(checkpoints[arch], prompt, N_TOKENS)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-4, rtol=0)
    assert tokens == expected_tokens


@pytest.mark.parametrize(
    "layer_ranges", [[(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)]], ids=["2 stages", "3 stages"]
)
@pytest.mark.parametrize("arch", ARCHS)
def test_split_stages_equal_the_whole(arch, layer_ranges, checkpoints, whole_stages):
    stages = [load_stage("mlx", checkpoints[arch], layer_range) for layer_range in layer_ranges]
    prompt = make_prompt(vocab_size(stages[0]), 7, seed=1)
    tokens, logits = greedy_decode(stages, prompt, 8)
    expected_tokens, expected_logits = greedy_decode([whole_stages[arch]], prompt, 8)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5, rtol=0)
    assert tokens == expected_tokens


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_a_step_mixing_prefill_and_decodes_equals_each_alone(arch, checkpoints):
    path = checkpoints[arch]
    mixed = [load_stage("mlx", path, (0, 2)), load_stage("mlx", path, (2, 4))]
    alone = [load_stage("mlx", path, (0, 2)), load_stage("mlx", path, (2, 4))]
    vocab = vocab_size(mixed[0])
    prompts = {
        1: make_prompt(vocab, 5, seed=1),
        2: make_prompt(vocab, 3, seed=2),
        3: make_prompt(vocab, 6, seed=3),
    }
    for seq_id in (1, 2):  # two sequences already prefilled, on both pipelines
        for stages in (mixed, alone):
            pipeline_logits(stages, [Segment(seq_id, 0, len(prompts[seq_id]), sample=True)], prompts[seq_id])

    segments = [
        Segment(3, 0, len(prompts[3]), sample=True),  # a prefill ...
        Segment(1, len(prompts[1]), 1, sample=True),  # ... and two decodes in the same step
        Segment(2, len(prompts[2]), 1, sample=True),
    ]
    decode_tokens = {1: np.array([11]), 2: np.array([12]), 3: prompts[3]}
    token_ids = np.concatenate([decode_tokens[s.seq_id] for s in segments])
    first_stage_step = StepInput(0, segments, token_ids=token_ids)
    mixed_hidden = mixed[0].forward(first_stage_step).hidden_states
    mixed_logits = mixed[1].forward(StepInput(0, segments, hidden_states=mixed_hidden)).logits

    offset = 0
    for row, segment in enumerate(segments):
        own = decode_tokens[segment.seq_id]
        alone_hidden = alone[0].forward(StepInput(0, [segment], token_ids=own)).hidden_states
        alone_logits = alone[1].forward(StepInput(0, [segment], hidden_states=alone_hidden)).logits
        np.testing.assert_allclose(
            np.array(mixed_hidden[offset : offset + segment.n_tokens]),
            np.array(alone_hidden),
            atol=1e-5,
            rtol=0,
        )
        np.testing.assert_allclose(mixed_logits[row], alone_logits[0], atol=1e-5, rtol=0)
        offset += segment.n_tokens


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # untied and tied embeddings
def test_each_stage_holds_only_its_own_tensors(arch, checkpoints):
    path = checkpoints[arch]
    middle = load_stage("mlx", path, (1, 3))
    names = parameter_names(middle)
    assert names and {name.split(".")[2] for name in names} == {"1", "2"}
    assert all(name.startswith(("model.layers.1.", "model.layers.2.")) for name in names)
    assert middle.weight_bytes() == checkpoint_tensor_bytes(path, names)

    first, last = load_stage("mlx", path, (0, 1)), load_stage("mlx", path, (3, 4))
    assert "model.embed_tokens.weight" in parameter_names(first)
    assert not {"model.norm.weight", "lm_head.weight"} & parameter_names(first)
    assert "model.norm.weight" in parameter_names(last)
    if arch == "qwen3":  # tied: the last stage projects with the embedding matrix, there is no lm_head
        assert "model.embed_tokens.weight" in parameter_names(last)
        assert "lm_head.weight" not in parameter_names(last)
    else:
        assert "lm_head.weight" in parameter_names(last)
        assert "model.embed_tokens.weight" not in parameter_names(last)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_the_torch_engine(arch, checkpoints, whole_stages):
    torch_stage = load_stage("torch", checkpoints[arch], (0, 4), device="cpu")
    prompt = make_prompt(vocab_size(torch_stage), 8, seed=4)
    tokens, logits = greedy_decode([whole_stages[arch]], prompt, 8)
    expected_tokens, expected_logits = greedy_decode([torch_stage], prompt, 8)
    # float32 in both: only the order of summation differs (observed ~1e-5 on logits up to ~40).
    np.testing.assert_allclose(logits, expected_logits, atol=1e-4, rtol=0)
    assert tokens == expected_tokens


def test_a_torch_stage_feeds_an_mlx_stage_and_back(checkpoints, whole_stages):
    path = checkpoints["llama"]
    stages = [
        load_stage("torch", path, (0, 1), device="cpu"),
        load_stage("mlx", path, (1, 3)),
        load_stage("torch", path, (3, 4), device="cpu"),
    ]
    prompt = make_prompt(vocab_size(stages[0]), 6, seed=5)
    tokens, logits = greedy_decode(stages, prompt, 6)
    expected_tokens, expected_logits = greedy_decode([whole_stages["llama"]], prompt, 6)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-4, rtol=0)
    assert tokens == expected_tokens


def test_hidden_states_may_come_as_numpy_torch_or_mlx(checkpoints):
    path = checkpoints["qwen3"]
    first, last = load_stage("mlx", path, (0, 2)), load_stage("mlx", path, (2, 4))
    prompt = make_prompt(vocab_size(first), 5, seed=6)
    segment = Segment(0, 0, len(prompt), sample=True)
    hidden_states = first.forward(StepInput(0, [segment], token_ids=prompt)).hidden_states
    assert isinstance(hidden_states, mx.array) and hidden_states.shape == (len(prompt), 64)
    results = []
    for converted in (hidden_states, np.array(hidden_states), torch.from_numpy(np.array(hidden_states))):
        results.append(last.forward(StepInput(0, [segment], hidden_states=converted)).logits)
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


def test_bfloat16_hidden_states_from_torch_are_read_as_bfloat16(checkpoints):
    stage = load_stage("mlx", checkpoints["qwen3"], (2, 4), dtype="bfloat16")
    values = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    segment = Segment(0, 0, 3, sample=True)
    from_torch = stage.forward(StepInput(0, [segment], hidden_states=values.to(torch.bfloat16))).logits
    stage.release([0])
    bit_patterns = values.to(torch.bfloat16).view(torch.int16).numpy()
    from_mlx = stage.forward(
        StepInput(0, [segment], hidden_states=mx.array(bit_patterns).view(mx.bfloat16))
    ).logits
    np.testing.assert_array_equal(from_torch, from_mlx)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_stages_stay_close_to_float32(dtype, checkpoints, whole_stages):
    stage = load_stage("mlx", checkpoints["llama"], (0, 4), dtype=dtype)
    assert stage.dtype == getattr(mx, dtype)
    assert all(array.dtype == getattr(mx, dtype) for _, array in tree_flatten(stage.model.parameters()))
    prompt = make_prompt(vocab_size(stage), 8, seed=7)
    segment = Segment(0, 0, len(prompt), sample=True)
    logits = pipeline_logits([stage], [segment], prompt)
    expected = pipeline_logits([whole_stages["llama"]], [segment], prompt)
    whole_stages["llama"].release([0])
    assert logits.dtype == np.float32
    # Four layers of 16-bit rounding on logits of magnitude ~15: a loose bound that still catches a wrong cast.
    np.testing.assert_allclose(logits, expected, atol=0.5, rtol=0)


def test_transformers5_rope_parameters_are_read(tmp_path, checkpoints, whole_stages):
    """A config.json with rope settings only under `rope_parameters` gives the same model."""
    path = tmp_path / "llama-rope-parameters"
    shutil.copytree(checkpoints["llama"], path)
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": config.pop("rope_theta"), **config.pop("rope_scaling")}
    (path / "config.json").write_text(json.dumps(config))
    stage = load_stage("mlx", path, (0, 4))
    prompt = make_prompt(vocab_size(stage), 6, seed=8)
    np.testing.assert_array_equal(
        greedy_decode([stage], prompt, 4)[1], greedy_decode([whole_stages["llama"]], prompt, 4)[1]
    )


def test_mistral_sliding_window_matches_the_torch_engine(tmp_path, checkpoints):
    """mlx-lm's Llama module ignores Mistral's `sliding_window`; the stage masks by it, as the torch engine."""
    path = tmp_path / "mistral-window-4"
    shutil.copytree(checkpoints["mistral"], path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "sliding_window": 4}))
    stage, torch_stage = load_stage("mlx", path, (0, 4)), load_stage("torch", path, (0, 4), device="cpu")
    prompt = make_prompt(vocab_size(stage), 10, seed=11)
    tokens, logits = greedy_decode([stage], prompt, 6)
    expected_tokens, expected_logits = greedy_decode([torch_stage], prompt, 6)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-4, rtol=0)
    assert tokens == expected_tokens
    full_attention = greedy_decode([load_stage("mlx", checkpoints["mistral"], (0, 4))], prompt, 6)[1]
    assert np.abs(logits - full_attention).max() > 0.1  # the window did change the output


def test_steps_may_run_on_another_thread_than_loading(checkpoints, whole_stages):
    """MLX streams are per thread: a stage loaded on one thread serves steps from others."""
    stage = load_stage("mlx", checkpoints["llama"], (0, 4))
    prompt = make_prompt(vocab_size(stage), 6, seed=9)
    results: list[Any] = []

    def run() -> None:
        try:
            results.append(greedy_decode([stage], prompt, 3))
        except Exception as error:  # reported below, on the test's thread
            results.append(error)

    for _ in range(2):  # a fresh thread each time, the KV caches made on the first
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
    expected = greedy_decode([whole_stages["llama"]], prompt, 3)
    for result in results:
        assert not isinstance(result, Exception), result
        assert result[0] == expected[0]


def test_a_lazy_input_from_another_thread_is_a_stage_error(checkpoints):
    stage = load_stage("mlx", checkpoints["qwen3"], (2, 4))
    lazy = mx.zeros((2, 64)) + 1  # not evaluated: bound to this thread's stream
    errors: list[Exception] = []

    def run() -> None:
        try:
            stage.forward(StepInput(0, [Segment(0, 0, 2, sample=True)], hidden_states=lazy))
        except Exception as error:
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert len(errors) == 1 and isinstance(errors[0], StageError), errors
    assert "lazy mx array made on another thread" in str(errors[0])


def test_a_step_from_an_earlier_position_restarts_the_sequence(whole_stages):
    stage = whole_stages["mistral"]
    prompt = make_prompt(vocab_size(stage), 8, seed=10)
    fresh = pipeline_logits([stage], [Segment(0, 0, 8, sample=True)], prompt)
    pipeline_logits([stage], [Segment(0, 8, 1, sample=True)], np.array([42]))
    pipeline_logits([stage], [Segment(0, 9, 1, sample=True)], np.array([43]))
    restarted = pipeline_logits([stage], [Segment(0, 5, 3, sample=True)], prompt[5:])
    stage.release([0])
    np.testing.assert_allclose(restarted, fresh, atol=1e-5, rtol=0)


def test_cache_errors_and_release(whole_stages):
    stage = whole_stages["qwen2"]
    with pytest.raises(StageError, match="first step starts at position 3"):
        stage.forward(StepInput(0, [Segment(7, 3, 1)], token_ids=np.array([5])))
    stage.forward(StepInput(0, [Segment(7, 0, 2)], token_ids=np.array([5, 6])))
    with pytest.raises(StageError, match="the cache holds 2"):
        stage.forward(StepInput(0, [Segment(7, 4, 1)], token_ids=np.array([5])))
    assert stage.live_sequences() == 1
    stage.release([7, 99])
    assert stage.live_sequences() == 0


def test_input_errors(checkpoints, whole_stages):
    with pytest.raises(StageError, match="needs token ids"):
        whole_stages["qwen3"].forward(StepInput(0, [Segment(0, 0, 2)]))
    with pytest.raises(StageError, match="3 inputs for 2 tokens"):
        whole_stages["qwen3"].forward(StepInput(0, [Segment(0, 0, 2)], token_ids=np.array([4, 5, 6])))
    with pytest.raises(StageError, match="needs hidden states"):
        load_stage("mlx", checkpoints["qwen3"], (2, 4)).forward(StepInput(0, [Segment(0, 0, 2)]))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layer_range": (2, 9)}, r"layer range \[2, 9\) is out of bounds: the model has 4 layers"),
        ({"layer_range": (2, 2)}, r"layer range \[2, 2\) is out of bounds"),
        ({"layer_range": (0, 4), "dtype": "int8"}, "dtype 'int8' is not one of"),
    ],
)
def test_bad_options_are_config_errors(options, message, checkpoints):
    with pytest.raises(ConfigError, match=message):
        load_stage("mlx", checkpoints["qwen3"], **options)


def test_stage_describes_itself(whole_stages):
    stage = whole_stages["qwen3"]
    device_type = "metal" if mx.metal.is_available() else "cpu"
    assert (stage.engine, stage.device_type, stage.dtype) == ("mlx", device_type, mx.float32)
    assert (stage.layer_range, stage.is_first, stage.is_last) == ((0, 4), True, True)
    assert stage.config.model_type == "qwen3"


def test_load_reports_progress_up_to_the_whole_range(checkpoints):
    fractions: list[float] = []
    load_stage("mlx", checkpoints["qwen3"], (1, 3), progress=fractions.append)
    assert fractions and fractions == sorted(fractions) and fractions[-1] == 1.0


def test_a_device_the_mlx_engine_cannot_use_is_refused(checkpoints):
    with pytest.raises(ConfigError, match=r"device 'cuda': the mlx engine runs on"):
        load_stage("mlx", checkpoints["qwen3"], (0, 2), device="cuda")
    assert load_stage("mlx", checkpoints["qwen3"], (0, 2), device="cpu").device_type == "cpu"


def test_a_misspelt_load_option_is_an_error_not_ignored(checkpoints):
    from meshllm.engines.mlx import load_stage as mlx_load_stage

    with pytest.raises(TypeError, match="progres"):
        mlx_load_stage(checkpoints["qwen3"], (0, 2), progres=print)


@pytest.mark.parametrize(("mode", "ratio"), [("int8", 0.6), ("int4", 0.4)])
def test_a_quantized_mlx_stage_holds_fewer_bytes_and_keeps_the_logits(checkpoints, whole_stages, mode, ratio):
    dense = whole_stages["qwen3"]
    quantized = load_stage("mlx", checkpoints["qwen3"], (0, 4), quantize=mode, group_size=32)
    prompt = make_prompt(dense.config.vocab_size, 12)
    segments = [Segment(0, 0, len(prompt), sample=True)]
    expected = pipeline_logits([dense], segments, prompt)[0]
    actual = pipeline_logits([quantized], segments, prompt)[0]
    cosine = float(np.dot(expected, actual) / (np.linalg.norm(expected) * np.linalg.norm(actual)))
    assert cosine > (0.999 if mode == "int8" else 0.95), cosine  # 4 bits: ~0.977 on these tiny weights
    embedding = dense.config.vocab_size * dense.config.hidden_size * 4  # stays a float table
    assert quantized.weight_bytes() - embedding < ratio * (dense.weight_bytes() - embedding)


def test_a_quantization_mode_that_does_not_exist_is_refused(checkpoints):
    with pytest.raises(ConfigError, match="quantize 'int3' is not one of int8, int4"):
        load_stage("mlx", checkpoints["qwen3"], (0, 2), quantize="int3")
