"""Find a checkpoint's files (a local folder or a hub id) and read single tensors from it by name."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from meshllm.defaults import AUTO_DTYPE, DTYPES
from meshllm.errors import ConfigError
from meshllm.models.config import ModelConfig

if TYPE_CHECKING:
    from meshllm.models.gguf import GgufModel

log = logging.getLogger(__name__)

DEMO_MODEL = "demo"


def cache_dir() -> Path:
    """Where meshllm keeps what it makes (the demo checkpoint); MESHLLM_CACHE overrides it."""
    return Path(os.environ.get("MESHLLM_CACHE", Path.home() / ".cache" / "meshllm"))


def resolve_model(reference: str) -> Path:
    """A local folder, a GGUF file, 'demo', or a Hugging Face hub id (downloaded, with a progress bar, when
    not cached)."""
    if reference == DEMO_MODEL:
        from meshllm.models.tiny import demo_checkpoint

        return demo_checkpoint()
    path = Path(reference).expanduser()
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:  # a folder with one GGUF file (a worker's share of one) is that file
            return found[0].resolve()
    if path.exists():
        if not path.is_dir() and path.suffix != ".gguf":
            raise ConfigError(
                f"model {reference!r}: a checkpoint is a folder (Hugging Face layout) or a .gguf file"
            )
        return path.resolve()
    if reference.startswith((".", "/", "~")) or reference.count("/") != 1:
        raise ConfigError(f"model {reference!r}: no such folder (and not a hub id of the form 'org/name')")
    return _download(reference)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as error:  # offline, unknown repo, gated: one line that says what to do
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"model {repo_id!r}: could not download from the Hugging Face hub ({reason}); "
            "pass the path of a local checkpoint folder instead"
        ) from None


@dataclass
class Checkpoint:
    """A checkpoint folder in Hugging Face layout: config.json, *.safetensors (one or sharded), tokenizer;
    or one GGUF file (llama.cpp's format: config, tokenizer and tensors in one), read by the ggml engine."""

    path: Path

    @classmethod
    def open(cls, reference: str | Path) -> Checkpoint:
        checkpoint = cls(resolve_model(str(reference)))
        _ = checkpoint.config  # fail early on a folder that is no checkpoint
        return checkpoint

    @cached_property
    def gguf(self) -> GgufModel | None:
        """The GGUF file this checkpoint is, opened memory-mapped; None for a Hugging Face folder."""
        from meshllm.models.gguf import GgufModel, is_gguf

        return GgufModel(self.path) if is_gguf(self.path) else None

    @property
    def own_dtype(self) -> str:
        """The dtype a model is served in where none is asked for (`--dtype auto`): the one its
        config.json says its weights are in (bfloat16, float16 or float32), else float32; float32 for a
        GGUF file (its matrices keep their own types whatever the dtype: it is that of the rest)."""
        stored = None if self.gguf is not None else self.config.torch_dtype
        return stored if stored in DTYPES else "float32"

    def served_dtype(self, dtype: str | None) -> str:
        """`dtype` ("auto" or None: `own_dtype`)."""
        return self.own_dtype if dtype in (None, AUTO_DTYPE) else dtype

    @cached_property
    def config(self) -> ModelConfig:
        if self.gguf is not None:
            return self.gguf.config
        return ModelConfig.from_file(self.path / "config.json")

    @cached_property
    def weight_map(self) -> dict[str, Path]:
        """Tensor name (Hugging Face's, for a GGUF file too) -> the file that holds it."""
        if self.gguf is not None:
            return dict.fromkeys(self.gguf.weight_names, self.path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            mapping = json.loads(index.read_text())["weight_map"]
            return {name: self.path / file for name, file in mapping.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"{self.path}: no *.safetensors files")
        from safetensors import safe_open

        weight_map: dict[str, Path] = {}
        for file in files:
            with safe_open(file, framework="numpy") as handle:
                weight_map.update(dict.fromkeys(handle.keys(), file))
        return weight_map

    def require(self, names: list[str]) -> None:
        missing = [name for name in names if name not in self.weight_map]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise ConfigError(f"{self.path}: tensor {shown} missing from the checkpoint's safetensors files")

    @property
    def name(self) -> str:
        return self.path.name
