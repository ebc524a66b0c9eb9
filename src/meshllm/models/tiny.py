"""Tiny random-weight checkpoints in the exact Hugging Face layout, for tests, benchmarks and the demo.

Their weights are random, so what they generate is noise; what they are good for is checking that every
engine, split and transport computes exactly what the reference implementation computes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meshllm.defaults import MODEL_TYPES
from meshllm.devices import LayerShape
from meshllm.models.checkpoint import cache_dir

log = logging.getLogger(__name__)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Text the tokenizer is trained on: enough variety for a few hundred merges.
_CORPUS = """
A pipeline splits a model's layers across machines so that each one holds only its share of the weights.
The coordinator embeds the prompt, runs the first layers and sends the hidden states to the next stage.
Every stage keeps a cache of keys and values for each live sequence, so a new token costs one pass.
Hello! How can I help you today? Tell me about the weather, the mountains, the sea and the river.
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun.
Numbers like 1, 2, 3, 10, 42, 100 and 2048 appear in code; so do names such as config, layer and token.
def forward(self, hidden_states): return self.norm(hidden_states) + residual  # a line of Python
Machines talk over the network: requests, responses, streams, messages, bytes and tensors.
User: What is the capital of France? Assistant: The capital of France is Paris.
Once upon a time there was a small robot who wanted to learn every language in the world.
"""


@dataclass(frozen=True)
class TinySpec:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    vocab_size: int = 512  # the tokenizer's target; the checkpoint uses the trained size
    max_position_embeddings: int = 2048
    # Large by default: well-spread logits, so greedy decoding in tests never meets a near-tie.
    embedding_std: float = 1.0
    # Keep vocab_size rows (a real model's embedding and lm_head) by filling the trained vocabulary with
    # tokens no merge produces: never in an encoded prompt, each decodes to a short word.
    fill_vocab: bool = False


ARCHS = MODEL_TYPES  # a tiny checkpoint of every model type the engines run


def _config(arch: str, spec: TinySpec, vocab_size: int, eos_id: int, bos_id: int) -> dict:
    config = {
        "architectures": [
            {
                "llama": "LlamaForCausalLM",
                "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM",
            }[arch]
        ],
        "model_type": arch,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0 if arch != "qwen3" else 1000000.0,
        "vocab_size": vocab_size,
        "tie_word_embeddings": arch == "qwen3",
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
        "attention_bias": False,
        "use_cache": True,
    }
    if arch == "llama":
        # Llama 3 style frequency scaling, so the scaled RoPE path is checked against the reference too.
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        }
        config["mlp_bias"] = False
    if arch == "mistral":
        config["sliding_window"] = None
    if arch in ("qwen2", "qwen3"):
        config["use_sliding_window"] = False
        config["sliding_window"] = None
        config["max_window_layers"] = spec.num_hidden_layers
    if arch == "qwen2":
        config["attention_bias"] = True
    return config


def _weights(
    arch: str, spec: TinySpec, vocab_size: int, seed: int, fast: bool = False
) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint, normally distributed; `fast`: uniform with the same spread, drawn
    ten times faster (for weights only timed, never checked against a reference)."""
    rng = np.random.default_rng(seed)

    def normal(*shape: int, std: float) -> np.ndarray:
        if fast:
            drawn = rng.random(shape, dtype=np.float32)
            drawn -= 0.5
            drawn *= std * 12**0.5
            return drawn
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    def norm_weight(size: int) -> np.ndarray:
        return (1.0 + rng.normal(0.0, 0.1, size=size)).astype(np.float32)

    hidden, inter, head_dim = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q_size, kv_size = spec.num_attention_heads * head_dim, spec.num_key_value_heads * head_dim
    # Larger-than-usual init so logits are well spread: no near-ties for greedy decoding to trip on.
    weights = {"model.embed_tokens.weight": normal(vocab_size, hidden, std=spec.embedding_std)}
    for i in range(spec.num_hidden_layers):
        prefix = f"model.layers.{i}"
        weights[f"{prefix}.input_layernorm.weight"] = norm_weight(hidden)
        weights[f"{prefix}.post_attention_layernorm.weight"] = norm_weight(hidden)
        for name, rows in (("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)):
            weights[f"{prefix}.self_attn.{name}.weight"] = normal(rows, hidden, std=hidden**-0.5)
            if arch == "qwen2":
                weights[f"{prefix}.self_attn.{name}.bias"] = normal(rows, std=0.1)
        weights[f"{prefix}.self_attn.o_proj.weight"] = normal(hidden, q_size, std=q_size**-0.5)
        if arch == "qwen3":
            weights[f"{prefix}.self_attn.q_norm.weight"] = norm_weight(head_dim)
            weights[f"{prefix}.self_attn.k_norm.weight"] = norm_weight(head_dim)
        weights[f"{prefix}.mlp.gate_proj.weight"] = normal(inter, hidden, std=hidden**-0.5)
        weights[f"{prefix}.mlp.up_proj.weight"] = normal(inter, hidden, std=hidden**-0.5)
        weights[f"{prefix}.mlp.down_proj.weight"] = normal(hidden, inter, std=inter**-0.5)
    weights["model.norm.weight"] = norm_weight(hidden)
    if arch != "qwen3":
        weights["lm_head.weight"] = normal(vocab_size, hidden, std=hidden**-0.5 * 4)
    return weights


def _train_tokenizer(path: Path, vocab_size: int, fill: bool = False) -> int:
    """Train a byte-level BPE tokenizer on the shipped corpus; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.strip().splitlines() * 4, trainer=trainer)
    tokenizer.save(str(path / "tokenizer.json"))
    if fill:
        _fill_vocab(path / "tokenizer.json", vocab_size)
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (path / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, indent=2)
    )
    return tokenizer.get_vocab_size()


def _fill_vocab(tokenizer_file: Path, vocab_size: int) -> None:
    """Add unreachable BPE tokens (' aa', ' ab', …: no merge builds them) until the vocabulary has vocab_size."""
    import itertools
    import string

    tokenizer = json.loads(tokenizer_file.read_text())
    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    words = (
        "\u0120" + "".join(letters)  # byte-level BPE's space
        for length in itertools.count(2)
        for letters in itertools.product(string.ascii_lowercase, repeat=length)
    )
    for word in words:
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(word, len(vocab))
    tokenizer_file.write_text(json.dumps(tokenizer, ensure_ascii=False))


def make_checkpoint(
    path: str | Path,
    arch: str = "qwen3",
    seed: int = 0,
    spec: TinySpec | None = None,
    shards: int = 1,
    dtype: str = "float32",
) -> Path:
    """Write a random-weight `arch` checkpoint to `path` (config, safetensors, tokenizer); returns the path.

    With shards > 1 the weights are split over several files with a `model.safetensors.index.json`.
    """
    from safetensors.numpy import save_file

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    spec = spec or TinySpec()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = _train_tokenizer(path, spec.vocab_size, fill=spec.fill_vocab)
    special = {token: SPECIAL_TOKENS.index(token) for token in SPECIAL_TOKENS}
    config = _config(arch, spec, vocab_size, eos_id=special["<|im_end|>"], bos_id=special["<|endoftext|>"])
    config["torch_dtype"] = dtype
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": config["eos_token_id"], "do_sample": False}, indent=2)
    )

    weights = _weights(arch, spec, vocab_size, seed)
    if dtype != "float32":
        import torch
        from safetensors.torch import save_file as save_torch

        torch_weights = {k: torch.from_numpy(v).to(getattr(torch, dtype)) for k, v in weights.items()}
        _save_sharded(torch_weights, path, shards, save_torch)
    else:
        _save_sharded(weights, path, shards, save_file)
    return path


def _save_sharded(weights: dict, path: Path, shards: int, save) -> None:
    names = list(weights)
    if shards <= 1:
        save(
            {name: weights[name] for name in names},
            str(path / "model.safetensors"),
            metadata={"format": "pt"},
        )
        return
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for index in range(shards):
        chunk = names[index * per_shard : (index + 1) * per_shard]
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save({name: weights[name] for name in chunk}, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
    total = sum(
        int(np.prod(w.shape)) * w.element_size() if hasattr(w, "element_size") else w.nbytes
        for w in weights.values()
    )
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))


def layer_checkpoint(path: str | Path, shape: LayerShape, layers: int, vocab_size: int = 64) -> Path:
    """Write a checkpoint of `layers` random decoder layers shaped as `shape` says and a token vocabulary of
    `vocab_size` (no tokenizer): what a calibration loads to time a model's layers without its weights."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spec = TinySpec(
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        vocab_size=vocab_size,
        max_position_embeddings=max(2048, 2 * shape.context),
    )
    config = _config(shape.model_type, spec, vocab_size, 0, 0)
    config["torch_dtype"] = "float16"  # half the bytes to write and read again; engines cast at load
    (path / "config.json").write_text(json.dumps(config))
    weights = _weights(shape.model_type, spec, vocab_size, seed=0, fast=True)
    halves = {name: array.astype(np.float16) for name, array in weights.items()}
    save_file(halves, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


DEMO_SPEC = TinySpec(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    vocab_size=1024,
    embedding_std=0.1,  # flatter logits: sampled replies are varied noise, not one repeated token
)


def demo_checkpoint() -> Path:
    """The Qwen3-shaped random-weight demo checkpoint, made once in the cache folder."""
    path = cache_dir() / "demo-qwen3"
    if not (path / "config.json").exists():
        log.info("making the demo checkpoint in %s (random weights: its output is noise)", path)
        partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
        make_checkpoint(partial, arch="qwen3", seed=0, spec=DEMO_SPEC)
        try:
            partial.rename(path)
        except OSError:  # another process made it first
            import shutil

            shutil.rmtree(partial, ignore_errors=True)
    return path
