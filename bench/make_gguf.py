"""A bfloat16 GGUF of a qwen3 checkpoint made by `meshllm.models.tiny`, for llama.cpp to load.

llama.cpp's own converter identifies a BPE pre-tokenizer by hashing its output on a test text, and a
tokenizer trained here matches no known hash; this writes the same file the converter would for Qwen3
(tensor names, hyperparameters, a "gpt2"-style BPE vocabulary: tokens, types and merges from
tokenizer.json, pre-tokenizer "gpt-2", which is the byte-level regex the tiny tokenizer splits with).
Tensors are copied as they are stored (bfloat16), norms as float32 as the converter writes them; tied
embeddings give no `output.weight` (llama.cpp then reads `token_embd.weight` as the lm_head).

It needs numpy and the `gguf` package only (no torch, no meshllm), so it runs in a small venv of its own:

    python3 -m venv ~/.cache/gguf-venv && ~/.cache/gguf-venv/bin/pip install gguf
    ~/.cache/gguf-venv/bin/python bench/make_gguf.py CHECKPOINT_DIR OUT.gguf
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np

# Hugging Face name below `model.layers.{i}.` -> GGUF name below `blk.{i}.`
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
SAFETENSORS_DTYPES = {"BF16": np.uint16, "F32": np.float32, "F16": np.float16}


def read_safetensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of one .safetensors file as (dtype name, memory-mapped array); bfloat16 as uint16."""
    with path.open("rb") as file:
        (header_size,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_size))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size)
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        array = data[begin:end].view(SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        tensors[name] = (entry["dtype"], array)
    return tensors


def checkpoint_tensors(folder: Path) -> dict[str, tuple[str, np.ndarray]]:
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(read_safetensors(file))
    return tensors


def gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    prefix, _, rest = name.partition(".layers.")
    index, _, tail = rest.partition(".")
    if prefix != "model" or tail not in LAYER_TENSORS:
        raise SystemExit(f"make_gguf: no GGUF name for tensor {name!r}")
    return f"blk.{int(index)}.{LAYER_TENSORS[tail]}"


def vocabulary(folder: Path, vocab_size: int) -> tuple[list[str], list[int], list[str], dict[str, int]]:
    """(tokens, token types, merges, special token ids) from tokenizer.json, padded to vocab_size."""
    import gguf

    tokenizer = json.loads((folder / "tokenizer.json").read_text())
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


def write_gguf(folder: Path, out: Path) -> None:
    import gguf

    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "qwen3":
        raise SystemExit(f"make_gguf: only qwen3 checkpoints, not {config.get('model_type')!r}")
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokens, types, merges, special = vocabulary(folder, config["vocab_size"])

    writer = gguf.GGUFWriter(str(out), "qwen3")
    writer.add_name(folder.name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(special[tokenizer_config["eos_token"]])
    writer.add_pad_token_id(special[tokenizer_config["pad_token"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer_config["chat_template"])

    for name, (dtype, array) in checkpoint_tensors(folder).items():
        target: Any = None
        if array.ndim == 1:  # norms: float32, as the converter keeps them
            array = (
                (array.astype(np.uint32) << 16).view(np.float32)
                if dtype == "BF16"
                else array.astype(np.float32)
            )
        elif dtype == "BF16":
            target = gguf.GGMLQuantizationType.BF16
        writer.add_tensor(gguf_name(name), array, raw_dtype=target)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="folder made by meshllm.models.tiny.make_checkpoint")
    parser.add_argument("out", type=Path, help="the .gguf file to write")
    args = parser.parse_args()
    partial = args.out.with_name(args.out.name + ".partial")
    write_gguf(args.checkpoint, partial)
    partial.rename(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e9:.2f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
