"""A stage's share of a checkpoint as files: what a worker without its own copy receives.

The share of layers [start, end) is the checkpoint's small files (config, tokenizer) and one safetensors
file per part of the model it needs: `embed.safetensors` (the first stage; the last too when embeddings
are tied), `layer-00003.safetensors` per decoder layer, `head.safetensors` (the final norm and lm_head).
Tensors travel as stored, bytes copied from the source files without decoding, so quantized checkpoints
(packed weights with their `.scales` and `.biases`) stay quantized. A share file's bytes depend only on
the checkpoint's content, so one of them is checked by its sha256 wherever it was made.

A checkpoint's content key names it for the workers' caches: the sha256 of its config and of every
safetensors file's header and content. File hashes are kept in a small index by path, size and mtime,
so a checkpoint is read whole once, not at every start; a file of the Hugging Face hub cache is already
named by its sha256 (its blob), which is taken as it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from meshllm.errors import ConfigError
from meshllm.models.checkpoint import Checkpoint, cache_dir
from meshllm.models.gguf import ROPE_FREQS
from meshllm.step import LayerRange

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 * 1024 * 1024  # bytes per read (and per message on the wire)
SMALL_FILE_PATTERNS = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken")
SMALL_FILE_LIMIT = 64 * 1024 * 1024  # a tokenizer is a few MB; anything larger is no small file
_INDEX = "model.safetensors.index.json"  # a share has its own files; the source's index would mislead
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
GGUF_SHARE = "model.gguf"  # the one file of a GGUF model's share


@dataclass(frozen=True)
class TensorSource:
    """One tensor's stored bytes: where they are in which source file."""

    name: str
    dtype: str  # safetensors' name: F32, BF16, U32, …
    shape: tuple[int, ...]
    path: Path
    offset: int  # from the start of the file
    nbytes: int


@dataclass(frozen=True)
class ShareFile:
    """One file of a share: a copy of a small file of the checkpoint, or a safetensors file made of
    `tensors` (sorted by name)."""

    name: str
    copy_of: Path | None = None
    tensors: tuple[TensorSource, ...] = ()
    metadata: tuple[tuple[str, str], ...] = ()

    @property
    def header(self) -> bytes:
        """The safetensors header (length prefix included) of the made file."""
        entries: dict[str, object] = {}
        if self.metadata:
            entries["__metadata__"] = dict(self.metadata)
        offset = 0
        for tensor in self.tensors:
            entries[tensor.name] = {
                "dtype": tensor.dtype,
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + tensor.nbytes],
            }
            offset += tensor.nbytes
        text = json.dumps(entries, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        return struct.pack("<Q", len(text)) + text

    @property
    def size(self) -> int:
        if self.copy_of is not None:
            return self.copy_of.stat().st_size
        return len(self.header) + sum(tensor.nbytes for tensor in self.tensors)

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        """The file's bytes, a chunk at a time (never the whole file in memory)."""
        if self.copy_of is not None:
            with open(self.copy_of, "rb") as copied:
                while chunk := copied.read(chunk_bytes):
                    yield chunk
            return
        yield self.header
        yield from _spans([(t.path, t.offset, t.nbytes, t.name, 0) for t in self.tensors], chunk_bytes)


@dataclass(frozen=True)
class GgufShareFile:
    """The share of a GGUF model: one GGUF file of the source's metadata and the range's tensors, their
    bytes as stored (quantized blocks included)."""

    name: str
    source: Path
    header: bytes  # everything before the tensor data (`GgufModel.range_file`)
    pieces: tuple[tuple[int, int, int], ...]  # per tensor: (offset in the source, bytes, zero bytes after)
    copy_of: None = None

    @property
    def size(self) -> int:
        return len(self.header) + sum(nbytes + padding for _, nbytes, padding in self.pieces)

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        yield self.header
        spans = [
            (self.source, offset, nbytes, f"a tensor at {offset}", padding)
            for offset, nbytes, padding in self.pieces
        ]
        yield from _spans(spans, chunk_bytes)


def _spans(spans: list[tuple[Path, int, int, str, int]], chunk_bytes: int) -> Iterator[bytes]:
    """The bytes of each (file, offset, length, what, zero bytes after), a chunk at a time."""
    handles: dict[Path, BinaryIO] = {}
    try:
        for path, offset, nbytes, what, padding in spans:
            handle = handles.get(path)
            if handle is None:
                handle = handles[path] = open(path, "rb")  # noqa: SIM115
            handle.seek(offset)
            left = nbytes
            while left:
                chunk = handle.read(min(chunk_bytes, left))
                if not chunk:
                    raise ConfigError(f"{path}: ends inside {what}")
                left -= len(chunk)
                yield chunk
            if padding:
                yield bytes(padding)
    finally:
        for handle in handles.values():
            handle.close()


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(bytes before the data, the header's JSON) of one safetensors file."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError) as error:
        raise ConfigError(f"{path}: not a readable safetensors file ({error})") from None
    return 8 + length, header


def _part_of(name: str, layer_range: LayerRange, num_layers: int, tied: bool) -> str | None:
    """The share file a tensor goes to for this range, or None when the range does not need it."""
    layer = _LAYER.match(name)
    if layer:
        index = int(layer.group(1))
        return f"layer-{index:05d}.safetensors" if layer_range.start <= index < layer_range.end else None
    is_first, is_last = layer_range.start == 0, layer_range.end == num_layers
    if name.startswith("model.embed_tokens."):
        return "embed.safetensors" if is_first or (is_last and tied) else None
    if name.startswith(("model.norm.", "lm_head.")):
        return "head.safetensors" if is_last else None
    return None  # e.g. rotary frequencies some checkpoints store: no engine reads them


def plan_share(checkpoint: Checkpoint, layer_range: LayerRange) -> Sequence[ShareFile | GgufShareFile]:
    """The files of the share of `layer_range`, small files first, then by name (a GGUF model's: one
    GGUF file, `model.gguf`, holding the tokenizer too)."""
    config = checkpoint.config
    if not 0 <= layer_range.start < layer_range.end <= config.num_hidden_layers:
        raise ConfigError(
            f"layers {layer_range} are not within the checkpoint's {config.num_hidden_layers} layers"
        )
    if checkpoint.gguf is not None:
        tied, num_layers = config.tie_word_embeddings, config.num_hidden_layers
        names = [  # the tensors the range reads, as the safetensors shares pick them, and RoPE's divisors
            tensor.name
            for name, tensor in checkpoint.gguf.tensors.items()
            if name == ROPE_FREQS or _part_of(name, layer_range, num_layers, tied) is not None
        ]
        before_data, pieces = checkpoint.gguf.range_file(names)
        return [GgufShareFile(GGUF_SHARE, checkpoint.path, before_data, tuple(pieces))]
    parts: dict[str, list[TensorSource]] = {}
    metadata: dict[str, str] = {}
    for path in sorted(set(checkpoint.weight_map.values())):
        data_start, header = read_header(path)
        metadata.update(header.pop("__metadata__", None) or {})
        for name, entry in header.items():
            part = _part_of(name, layer_range, config.num_hidden_layers, config.tie_word_embeddings)
            if part is None:
                continue
            begin, end = entry["data_offsets"]
            source = TensorSource(
                name, entry["dtype"], tuple(entry["shape"]), path, data_start + begin, end - begin
            )
            parts.setdefault(part, []).append(source)
    small = [
        ShareFile(path.name, copy_of=path)
        for path in sorted({p for pattern in SMALL_FILE_PATTERNS for p in checkpoint.path.glob(pattern)})
        if path.name != _INDEX and path.is_file() and path.stat().st_size <= SMALL_FILE_LIMIT
    ]
    made = [
        ShareFile(
            part,
            tensors=tuple(sorted(tensors, key=lambda t: t.name)),
            metadata=tuple(sorted(metadata.items())),
        )
        for part, tensors in sorted(parts.items())
    ]
    return small + made


def share_bytes(checkpoint: Checkpoint, layer_range: LayerRange) -> int:
    """Bytes of the share's files: what a worker's cache holds for the range."""
    return sum(file.size for file in plan_share(checkpoint, layer_range))


def content_key(checkpoint: Checkpoint) -> str:
    """The checkpoint's content key (64 hex digits): config, and every safetensors file's header and sha256."""
    digest = hashlib.sha256()
    hashes = FileHashes(cache_dir() / "file-hashes.json")
    if checkpoint.gguf is not None:  # one file: its metadata, tokenizer and tensors
        digest.update(b"gguf\0" + bytes.fromhex(hashes.sha256(checkpoint.path)))
        hashes.save()
        return digest.hexdigest()
    digest.update(hashlib.sha256((checkpoint.path / "config.json").read_bytes()).digest())
    for path in sorted(set(checkpoint.weight_map.values())):
        data_start, _ = read_header(path)
        with open(path, "rb") as handle:
            header = handle.read(data_start)
        digest.update(path.name.encode() + b"\0" + header + bytes.fromhex(hashes.sha256(path)))
    hashes.save()
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class FileHashes:
    """sha256 of files by (real path, size, mtime), kept in a JSON file so each is read whole once."""

    def __init__(self, index: Path):
        self.index = index
        try:
            self.known: dict[str, list] = json.loads(index.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    def sha256(self, path: Path) -> str:
        real = path.resolve()
        if real.parent.name == "blobs" and _SHA256.match(real.name):
            return real.name  # the hub cache names a large file by its sha256
        stat = real.stat()
        known = self.known.get(str(real))
        if known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
            return str(known[2])
        log.info("hashing %s (%.0f MB; once)", real, stat.st_size / 1e6)
        value = sha256_file(real)
        self.known[str(real)] = [stat.st_size, stat.st_mtime_ns, value]
        self.changed = True
        return value

    def save(self) -> None:
        if not self.changed:
            return
        try:
            self.index.parent.mkdir(parents=True, exist_ok=True)
            partial = self.index.with_name(f"{self.index.name}.{os.getpid()}")
            partial.write_text(json.dumps(self.known))
            partial.replace(self.index)
        except OSError as error:  # a read-only cache costs a rehash next time, nothing else
            log.warning("cannot keep file hashes in %s: %s", self.index, error)
