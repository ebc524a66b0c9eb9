"""GGUF files (llama.cpp's format) as models: the config, the tokenizer and the tensors of a layer range.

A GGUF file holds the hyperparameters as `{arch}.*` keys, the tokenizer as `tokenizer.ggml.*` keys (with
the chat template) and the tensors under llama.cpp's names (`blk.{i}.attn_q.weight`, `token_embd.weight`,
…), each in its own ggml type (f32, f16, bf16, q8_0, q4_0, q4_K, q6_K, …) with its dimensions fastest
first. Here the names map onto the Hugging Face ones the rest of meshllm speaks (`model.layers.{i}.…`), and
the data of a tensor stays in the memory-mapped file until a stage of its range reads it: a stage holding
layers `[start, end)` touches only those.

Two layouts differ from a Hugging Face checkpoint: llama.cpp's converter reorders the rows of a Llama
(and Mistral) model's q and k projections so that RoPE rotates adjacent pairs (`interleaved_rope`); and
Llama 3's frequency scaling travels as a tensor of per-frequency divisors (`rope_freqs.weight`).

`write_gguf` writes a Hugging Face checkpoint as the converter would, for the tests and the benchmarks.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from meshllm.errors import ConfigError
from meshllm.models.config import ModelConfig

# Hugging Face name below `model.layers.{i}.` -> GGUF name below `blk.{i}.`
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
MODEL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3 scaling: per-frequency divisors of the default angles
# in a file made of a layer range's tensors (a worker's share), whether the whole model ties its lm_head to
# the embedding: there the absence of `output.weight` no longer tells
TIED_KEY = "meshllm.tie_word_embeddings"
_BOOL = 7  # GGUFValueType.BOOL
ARCHITECTURES = ("llama", "qwen2", "qwen3")  # llama.cpp converts Mistral models as "llama"


def is_gguf(path: Path) -> bool:
    return path.suffix == ".gguf" and path.is_file()


def gguf_name(name: str) -> str:
    """The GGUF name of a Hugging Face tensor name."""
    if name in MODEL_NAMES:
        return MODEL_NAMES[name]
    prefix, _, rest = name.partition(".layers.")
    index, _, tail = rest.partition(".")
    if prefix != "model" or not index.isdigit() or tail not in LAYER_NAMES:
        raise ConfigError(f"tensor {name!r} has no GGUF name")
    return f"blk.{int(index)}.{LAYER_NAMES[tail]}"


_HF_OF_LAYER = {gguf: hf for hf, gguf in LAYER_NAMES.items()}
_HF_OF_MODEL = {gguf: hf for hf, gguf in MODEL_NAMES.items()}


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor name; None for tensors meshllm does not read by name."""
    if name in _HF_OF_MODEL:
        return _HF_OF_MODEL[name]
    block, _, rest = name.partition(".")
    index, _, tail = rest.partition(".")
    if block != "blk" or not index.isdigit() or tail not in _HF_OF_LAYER:
        return None
    return f"model.layers.{int(index)}.{_HF_OF_LAYER[tail]}"


@dataclass(frozen=True)
class GgufTensor:
    """One tensor as stored: its ggml type (`gguf.GGMLQuantizationType` value), its shape in numpy order
    (`[rows, columns]` for a matrix) and its bytes, still in the memory-mapped file."""

    name: str  # the GGUF name
    ggml_type: int
    type_name: str  # "F32", "Q8_0", …
    shape: tuple[int, ...]
    nbytes: int
    data: np.ndarray  # uint8 view of the file

    def float32(self) -> np.ndarray:
        """The values, dequantized, in numpy order."""
        import gguf

        return np.asarray(
            gguf.quants.dequantize(self.data, gguf.GGMLQuantizationType(self.ggml_type)), dtype=np.float32
        ).reshape(self.shape)


class GgufModel:
    """One GGUF file, opened memory-mapped; nothing is read from its tensor data until asked."""

    def __init__(self, path: Path):
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(path, "r")
        except Exception as error:
            raise ConfigError(f"{path}: not a readable GGUF file ({error})") from None
        self.arch = str(self.value("general.architecture", ""))
        if self.arch not in ARCHITECTURES:
            raise ConfigError(
                f"{path}: GGUF architecture {self.arch!r} is not supported "
                f"(supported: {', '.join(ARCHITECTURES)}; Mistral models are converted as 'llama')"
            )

    def value(self, key: str, default: Any = None) -> Any:
        field = self.reader.get_field(key)
        if field is None:
            return default
        value = field.contents()
        return value.item() if isinstance(value, np.generic) else value

    def _required(self, key: str) -> Any:
        value = self.value(f"{self.arch}.{key}")
        if value is None:
            raise ConfigError(f"{self.path}: the GGUF file has no '{self.arch}.{key}'")
        return value

    @cached_property
    def tensors(self) -> dict[str, GgufTensor]:
        """Every tensor meshllm reads, by its Hugging Face name (and `rope_freqs.weight` as it is)."""
        found: dict[str, GgufTensor] = {}
        for tensor in self.reader.tensors:
            name = ROPE_FREQS if tensor.name == ROPE_FREQS else hf_name(tensor.name)
            if name is None:
                continue
            found[name] = GgufTensor(
                name=tensor.name,
                ggml_type=int(tensor.tensor_type),
                type_name=tensor.tensor_type.name,
                shape=tuple(int(dim) for dim in reversed(tensor.shape.tolist())),
                nbytes=int(tensor.n_bytes),
                data=np.asarray(tensor.data).reshape(-1).view(np.uint8),
            )
        return found

    @property
    def weight_names(self) -> list[str]:
        """The Hugging Face names of the model's weights in the file."""
        return [name for name in self.tensors if name != ROPE_FREQS]

    def stored_quantize(self) -> str | None:
        """The meshllm quantization nearest to how most of the file's matrix bytes are stored (int8 for
        8-bit blocks, int4 for 4-bit ones), or None for floats: what a calibration should read."""
        by_type: dict[str, int] = {}
        for tensor in self.tensors.values():
            if len(tensor.shape) == 2:
                by_type[tensor.type_name] = by_type.get(tensor.type_name, 0) + int(np.prod(tensor.shape))
        main = max(by_type, key=by_type.__getitem__, default="F32")
        if main.startswith("Q8"):
            return "int8"
        if main.startswith(("Q4", "IQ4")):
            return "int4"
        return None

    @property
    def interleaved_rope(self) -> bool:
        """Whether q and k rows are reordered for RoPE over adjacent pairs (llama.cpp's Llama layout)."""
        return self.arch == "llama"

    @cached_property
    def config(self) -> ModelConfig:
        heads = int(self._required("attention.head_count"))
        hidden = int(self._required("embedding_length"))
        tokens = self.value("tokenizer.ggml.tokens") or []
        config: dict[str, Any] = {
            "model_type": self.arch,
            "hidden_size": hidden,
            "intermediate_size": int(self._required("feed_forward_length")),
            "num_hidden_layers": int(self._required("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self.value(f"{self.arch}.attention.head_count_kv", heads)),
            "head_dim": int(self.value(f"{self.arch}.attention.key_length", hidden // heads)),
            "vocab_size": int(self.value(f"{self.arch}.vocab_size", len(tokens))),
            # stored as float32: 1e-6 would read back as 9.99999997e-07
            "rms_norm_eps": float(f"{self.value(f'{self.arch}.attention.layer_norm_rms_epsilon', 1e-6):.7g}"),
            "rope_theta": float(self.value(f"{self.arch}.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self.value(f"{self.arch}.context_length", 4096)),
            "tie_word_embeddings": bool(self.value(TIED_KEY, "lm_head.weight" not in self.tensors)),
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self.tensors,
            "bos_token_id": self.value("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.value("tokenizer.ggml.eos_token_id"),
        }
        scaling = self.value(f"{self.arch}.rope.scaling.type")
        if scaling == "linear":
            config["rope_scaling"] = {
                "rope_type": "linear",
                "factor": float(self.value(f"{self.arch}.rope.scaling.factor", 1.0)),
            }
        elif scaling not in (None, "none"):
            raise ConfigError(f"{self.path}: RoPE scaling {scaling!r} is not supported (linear is)")
        return ModelConfig.from_dict(config, source=str(self.path))

    @property
    def chat_template(self) -> str | None:
        return self.value("tokenizer.chat_template")

    def range_file(self, names: list[str]) -> tuple[bytes, list[tuple[int, int, int]]]:
        """A GGUF file of this one's metadata (and `TIED_KEY`) and only the tensors `names`: its bytes
        before the tensor data, and per tensor (offset in this file, bytes, zero bytes after it)."""
        reader = self.reader
        if reader.byte_order != "I":
            raise ConfigError(f"{self.path}: a big-endian GGUF file cannot be shared")
        by_name = {tensor.name: tensor for tensor in reader.tensors}
        kv_end = min(tensor.field.offset for tensor in reader.tensors)
        metadata = bytes(reader.data[24:kv_end])  # magic, version, counts: 24 bytes; then the keys
        n_kv = int(reader.fields["GGUF.kv_count"].parts[0][0])
        if reader.get_field(TIED_KEY) is None:
            key = TIED_KEY.encode()
            metadata += (
                struct.pack("<Q", len(key)) + key + struct.pack("<IB", _BOOL, self.config.tie_word_embeddings)
            )
            n_kv += 1
        align = reader.alignment
        infos, pieces, offset = b"", [], 0
        for name in names:
            tensor = by_name[name]
            encoded = name.encode()
            dims = [int(dim) for dim in tensor.shape.tolist()]
            infos += struct.pack("<Q", len(encoded)) + encoded + struct.pack("<I", len(dims))
            infos += struct.pack(f"<{len(dims)}QIQ", *dims, int(tensor.tensor_type), offset)
            padding = -tensor.n_bytes % align
            pieces.append((int(tensor.data_offset), int(tensor.n_bytes), padding))
            offset += tensor.n_bytes + padding
        version = int(reader.fields["GGUF.version"].parts[0][0])
        header = b"GGUF" + struct.pack("<IQQ", version, len(names), n_kv) + metadata + infos
        return header + b"\0" * (-len(header) % align), pieces


# the split before byte-level BPE, by `tokenizer.ggml.pre` (llama.cpp's names); others split as GPT-2 does
PRE_TOKENIZER_REGEX = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of tokens that are never split


def gguf_tokenizer(model: GgufModel) -> Any:
    """The file's tokenizer as a transformers tokenizer, with its chat template. A byte-level BPE vocabulary
    (`tokenizer.ggml.model` "gpt2", as Qwen and Llama 3 have) is built here with the split its
    `tokenizer.ggml.pre` names; others (SentencePiece's "llama") go through transformers' own converter."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if model.value("tokenizer.ggml.model") != "gpt2":
        return AutoTokenizer.from_pretrained(str(model.path.parent), gguf_file=model.path.name)
    tokens: list[str] = model.value("tokenizer.ggml.tokens")
    types: list[int] = model.value("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(merge.split(" ", 1)) for merge in model.value("tokenizer.ggml.merges") or []]
    tokenizer = Tokenizer(models.BPE({token: i for i, token in enumerate(tokens)}, merges))
    regex = PRE_TOKENIZER_REGEX.get(model.value("tokenizer.ggml.pre", "default"))
    if regex is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [
            AddedToken(token, special=True)
            for token, kind in zip(tokens, types, strict=True)
            if kind in (CONTROL, USER_DEFINED)
        ]
    )

    def token(key: str) -> str | None:
        index = model.value(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=token("bos"),
        eos_token=token("eos"),
        pad_token=token("padding"),
        chat_template=model.chat_template,
        clean_up_tokenization_spaces=False,
    )


def rope_freq_divisors(model: GgufModel) -> np.ndarray | None:
    """Llama 3's per-frequency divisors when the file carries them (`[head_dim / 2]` float32), else None."""
    tensor = model.tensors.get(ROPE_FREQS)
    return None if tensor is None else tensor.float32().reshape(-1)


def interleave_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of a q or k projection's rows (or bias) for RoPE over adjacent pairs: each
    head's first and second halves are interleaved."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _vocabulary(folder: Path, vocab_size: int) -> tuple[list[str], list[Any], list[str], dict[str, int]]:
    """(tokens, token types, merges, special token ids) from a byte-level BPE tokenizer.json, padded to
    `vocab_size`."""
    import gguf

    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    if tokenizer["model"].get("type") != "BPE":
        raise ConfigError(f"{folder}: only byte-level BPE tokenizers are written to GGUF here")
    by_id = {token_id: token for token, token_id in tokenizer["model"]["vocab"].items()}
    special = {added["content"]: added["id"] for added in tokenizer["added_tokens"] if added["special"]}
    for content, token_id in special.items():
        by_id[token_id] = content
    tokens, types = [], []
    for token_id in range(vocab_size):
        token = by_id.get(token_id)
        if token is None:
            tokens.append(f"[PAD{token_id}]")  # what llama.cpp's converter writes for a gap
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    return tokens, types, merges, special


def write_gguf(folder: Path, out: Path, tensor_type: str = "F32") -> Path:
    """Write the Hugging Face checkpoint in `folder` (one of meshllm's four architectures, a byte-level BPE
    tokenizer) as the GGUF file `out`, with its matrices in `tensor_type` (F32, F16, BF16, Q8_0, Q4_0, …)
    and its vectors in float32, as llama.cpp's converter lays it out."""
    import gguf
    from safetensors import safe_open

    from meshllm.models.checkpoint import Checkpoint
    from meshllm.models.rope import inverse_frequencies

    checkpoint = Checkpoint(folder)
    config = checkpoint.config
    if config.quantization:
        raise ConfigError(f"{folder}: a quantized checkpoint is not written to GGUF here")
    arch = "llama" if config.model_type == "mistral" else config.model_type
    matrix_type = gguf.GGMLQuantizationType[tensor_type.upper()]
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokens, types, merges, special = _vocabulary(folder, config.vocab_size)

    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(folder.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    scaling = (config.rope_scaling or {}).get("rope_type") or (config.rope_scaling or {}).get("type")
    if scaling == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(config.rope_scaling["factor"]))  # type: ignore[index]

    writer.add_tokenizer_model("gpt2")
    # the split transformers applies to the checkpoint's text (a qwen2 checkpoint gets Qwen2's own)
    writer.add_tokenizer_pre("qwen2" if config.model_type == "qwen2" else "gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(special[tokenizer_config["eos_token"]])
    if tokenizer_config.get("pad_token") in special:
        writer.add_pad_token_id(special[tokenizer_config["pad_token"]])
    if config.bos_token_id is not None:
        writer.add_bos_token_id(config.bos_token_id)
    writer.add_add_bos_token(False)
    if tokenizer_config.get("chat_template"):
        writer.add_chat_template(tokenizer_config["chat_template"])

    if scaling == "llama3":
        inv_freq, scaled = inverse_frequencies(config)
        writer.add_tensor(ROPE_FREQS, (inv_freq / scaled).astype(np.float32))
    for name, file in sorted(checkpoint.weight_map.items()):
        with safe_open(file, framework="pt") as handle:  # torch: bfloat16 checkpoints too
            array = handle.get_tensor(name).float().numpy()
        if arch == "llama" and ".q_proj." in name:
            array = interleave_rows(array, config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            array = interleave_rows(array, config.num_key_value_heads)
        if array.ndim == 1 or matrix_type == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(name), array)
        else:
            packed = gguf.quants.quantize(array, matrix_type)
            writer.add_tensor(gguf_name(name), packed, raw_shape=packed.shape, raw_dtype=matrix_type)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
