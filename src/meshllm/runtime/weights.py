"""Weights over the cluster, the runtime's part: the coordinator's checkpoint as a `WeightSource`, and a
worker's cache of its shares.

A worker without its own copy keeps each share in `<cache>/<content key>/layers-<start>-<end>/` (the
share's config, tokenizer and safetensors files) with `sha256.json` listing the hash of every file it
checked. Before each load it checks every file of the share against that list (a missing, changed or
unlisted file is discarded), fetches what is not there, streaming each file to disk and comparing its
sha256 with the sender's, and then loads from the folder like any checkpoint. A restart that keeps its
range finds everything there and receives 0 bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from meshllm.errors import ConfigError, StageError
from meshllm.models.checkpoint import Checkpoint, cache_dir
from meshllm.models.share import GgufShareFile, ShareFile, content_key, plan_share, sha256_file
from meshllm.step import LayerRange
from meshllm.transport.weights import ShareEntry, WeightsClient

log = logging.getLogger(__name__)

WEIGHTS_CACHE_ENV = "MESHLLM_WEIGHTS_CACHE"
_HASHES = "sha256.json"
FETCH_ATTEMPTS = 3  # a file whose bytes arrive damaged is fetched again, up to this many times


def default_weights_cache() -> Path:
    """Where a worker keeps the shares it received: $MESHLLM_WEIGHTS_CACHE, else <meshllm cache>/weights."""
    configured = os.environ.get(WEIGHTS_CACHE_ENV)
    return Path(configured).expanduser() if configured else cache_dir() / "weights"


class CheckpointWeights:
    """A local checkpoint handed out in shares (what the coordinator's Weights service serves)."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.key = content_key(checkpoint)
        self._shares: dict[LayerRange, dict[str, ShareFile | GgufShareFile]] = {}

    def _share(self, layer_range: LayerRange) -> dict[str, ShareFile | GgufShareFile]:
        if layer_range not in self._shares:
            self._shares[layer_range] = {file.name: file for file in plan_share(self.checkpoint, layer_range)}
        return self._shares[layer_range]

    def share(self, layer_range: LayerRange) -> list[ShareEntry]:
        return [ShareEntry(file.name, file.size) for file in self._share(layer_range).values()]

    def chunks(self, layer_range: LayerRange, name: str) -> Iterator[bytes]:
        file = self._share(layer_range).get(name)
        if file is None:
            raise ConfigError(f"{name} is not a file of the share of layers {layer_range}")
        return file.chunks()


@dataclass(frozen=True)
class FetchReport:
    """What taking a share cost: files and bytes received, files the cache already held."""

    folder: Path
    files_received: int
    bytes_received: int
    files_cached: int
    files_discarded: int  # found damaged or changed in the cache, fetched again
    seconds: float

    def describe(self, layer_range: LayerRange) -> str:
        rate = self.bytes_received / self.seconds / 1e6 if self.seconds > 0 else 0.0
        line = (
            f"weights of layers {layer_range}: {self.bytes_received} bytes received "
            f"({self.bytes_received / 1e6:.1f} MB, {self.files_received} files, {self.seconds:.1f} s, "
            f"{rate:.0f} MB/s), {self.files_cached} files from the cache"
        )
        if self.files_discarded:
            line += f", {self.files_discarded} damaged files discarded and fetched again"
        return line


class WeightCache:
    """The shares this device received, by checkpoint content key and layer range."""

    def __init__(self, root: Path | None = None):
        self.root = root or default_weights_cache()

    def folder(self, key: str, layer_range: LayerRange) -> Path:
        return self.root / key[:32] / f"layers-{layer_range.start}-{layer_range.end}"

    def take(
        self,
        client: WeightsClient,
        layer_range: LayerRange,
        received: Callable[[int, int], None] | None = None,
    ) -> FetchReport:
        """The folder of the share of `layer_range`, complete and checked; fetches what it lacks."""
        started = time.perf_counter()
        entries = client.share(layer_range)
        for entry in entries:  # names become paths here: nothing may point outside the share's folder
            if (
                Path(entry.name).name != entry.name
                or entry.name in (".", "..", _HASHES)
                or entry.name.endswith(".partial")
            ):
                raise StageError(f"weights from {client.address}: refused a file named {entry.name!r}")
        folder = self.folder(client.key, layer_range)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StageError(f"weights cache {folder}: {error.strerror}") from None
        hashes = _read_hashes(folder / _HASHES)
        wanted = {entry.name for entry in entries}
        for stray in folder.iterdir():  # leftovers of an interrupted fetch, files of no share
            if stray.name != _HASHES and stray.name not in wanted:
                stray.unlink(missing_ok=True)
        missing: list[ShareEntry] = []
        discarded = 0
        for entry in entries:
            path = folder / entry.name
            if not path.exists():
                missing.append(entry)
                continue
            if path.stat().st_size == entry.size and hashes.get(entry.name) == sha256_file(path):
                continue
            log.warning("weights cache: %s is damaged or changed; discarded, fetching it again", path)
            path.unlink()
            hashes.pop(entry.name, None)
            missing.append(entry)
            discarded += 1
        reused = [entry for entry in missing if self._reuse(folder, entry, hashes)]
        if reused:
            _write_hashes(folder / _HASHES, hashes)
            log.info("weights cache: %d files taken from other ranges of the same checkpoint", len(reused))
        missing = [entry for entry in missing if entry not in reused]
        total = sum(entry.size for entry in missing)
        done = 0
        if received is not None:
            received(0, total)
        for entry in missing:

            def counted(size: int, base: int = done) -> None:
                if received is not None:
                    received(base + size, total)

            hashes[entry.name] = self._fetch(client, layer_range, entry, folder, counted)
            _write_hashes(folder / _HASHES, hashes)
            done += entry.size
        if received is not None:
            received(total, total)
        return FetchReport(
            folder=folder,
            files_received=len(missing),
            bytes_received=total,
            files_cached=len(entries) - len(missing),
            files_discarded=discarded,
            seconds=time.perf_counter() - started,
        )

    def _reuse(self, folder: Path, entry: ShareEntry, hashes: dict[str, str]) -> bool:
        """Take the file from another range's folder of the same checkpoint, when one holds it intact:
        a share file's bytes depend only on the checkpoint, so a re-plan fetches only the layers it gains."""
        for sibling in sorted(folder.parent.glob("layers-*")):
            candidate = sibling / entry.name
            if sibling == folder or not candidate.exists() or candidate.stat().st_size != entry.size:
                continue
            recorded = _read_hashes(sibling / _HASHES).get(entry.name)
            if recorded is None or sha256_file(candidate) != recorded:
                continue
            target = folder / entry.name
            try:
                os.link(candidate, target)  # the same blocks on disk, no copy
            except OSError:
                shutil.copyfile(candidate, target)
            hashes[entry.name] = recorded
            return True
        return False

    def _fetch(
        self,
        client: WeightsClient,
        layer_range: LayerRange,
        entry: ShareEntry,
        folder: Path,
        counted: Callable[[int], None],
    ) -> str:
        """Stream one file to disk (under a temporary name until its sha256 matches); returns the sha256."""
        partial = folder / f"{entry.name}.partial"
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            try:
                with open(partial, "wb") as handle:
                    sink = _HashingWriter(handle, counted)
                    expected = client.fetch(layer_range, entry.name, sink.write)
            except OSError as error:  # a full disk, a read-only cache
                partial.unlink(missing_ok=True)
                raise StageError(
                    f"weights cache {folder}: cannot write {entry.name} ({entry.size / 1e6:.1f} MB): "
                    f"{error.strerror or error}; free space there or set MESHLLM_WEIGHTS_CACHE / --weights-cache"
                ) from None
            if sink.digest.hexdigest() == expected and sink.written == entry.size:
                partial.replace(folder / entry.name)
                return expected
            log.warning(
                "weights: %s arrived damaged (%d of %d bytes, sha256 %s, sent %s; attempt %d)",
                entry.name,
                sink.written,
                entry.size,
                sink.digest.hexdigest()[:12],
                expected[:12],
                attempt,
            )
        partial.unlink(missing_ok=True)
        raise StageError(
            f"weights from {client.address}: {entry.name} arrived damaged {FETCH_ATTEMPTS} times"
        )


class _HashingWriter:
    """Writes chunks to a file, hashing and counting them on the way."""

    def __init__(self, handle: BinaryIO, counted: Callable[[int], None]):
        self.handle = handle
        self.counted = counted
        self.digest = hashlib.sha256()
        self.written = 0

    def write(self, chunk: bytes) -> None:
        self.handle.write(chunk)
        self.digest.update(chunk)
        self.written += len(chunk)
        self.counted(self.written)


def _read_hashes(path: Path) -> dict[str, str]:
    try:
        hashes = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(name): str(value) for name, value in hashes.items()} if isinstance(hashes, dict) else {}


def _write_hashes(path: Path, hashes: dict[str, str]) -> None:
    partial = path.with_name(f"{path.name}.partial")
    partial.write_text(json.dumps(hashes, indent=1, sort_keys=True))
    partial.replace(path)
