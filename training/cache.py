"""An on-disk activation cache: harvest once, train several SAEs (an L1 sweep, several widths).

A cache is a folder of safetensors shards, each holding one `(n, d_in)` float32 tensor named
`activations`, and a `manifest.json` written last that lists the shards with their sizes and
SHA-256 and describes where the activations came from. A folder without a manifest is an
unfinished cache and is refused. Reading holds one shard at a time (plus the shuffle buffer),
so memory stays bounded whatever the cache's size.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from sae.errors import SAEFileError
from sae.files import atomic_write, read_safetensors
from training.errors import DataSourceError
from training.sources import ChunkSource, ShuffleBuffer

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CACHE_FORMAT_VERSION = 1


def write_activation_cache(chunks: ChunkSource, folder: str | Path, *, n_tokens: int,
                           shard_tokens: int = 65536) -> Path:
    """Write at least `n_tokens` activations from `chunks` to `folder` in shards; return it."""
    folder = Path(folder)
    if (folder / MANIFEST).exists():
        raise DataSourceError(f"{folder} already holds an activation cache; choose another folder")
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    pending: list[Tensor] = []
    written = pending_rows = 0
    while written < n_tokens:
        chunk = chunks.next_chunk()
        pending.append(chunk.float())
        pending_rows += chunk.shape[0]
        # Write full shards; once enough tokens are in hand, write the remainder too.
        while pending_rows >= shard_tokens or (pending_rows and written + pending_rows >= n_tokens):
            rows = torch.cat(pending)
            shard, rest = rows[:shard_tokens], rows[shard_tokens:]
            shards.append(_write_shard(folder, len(shards), shard))
            written += shard.shape[0]
            pending, pending_rows = ([rest] if rest.shape[0] else []), rest.shape[0]
            log.info("activation cache %s: %d / %d tokens", folder, written, n_tokens)
    manifest = {"format_version": CACHE_FORMAT_VERSION, "d_in": chunks.d_in, "dtype": "float32",
                "n_tokens": written, "shards": shards, "source": chunks.describe()}
    atomic_write(folder / MANIFEST, json.dumps(manifest, indent=2).encode())
    return folder


def _write_shard(folder: Path, index: int, rows: Tensor) -> dict[str, Any]:
    blob = save_safetensors_bytes({"activations": rows.contiguous()})
    name = f"shard-{index:05d}.safetensors"
    atomic_write(folder / name, blob)
    return {"file": name, "n_tokens": rows.shape[0], "sha256": hashlib.sha256(blob).hexdigest()}


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DataSourceError(f"{folder} has no {MANIFEST}: not an activation cache, or one never finished")
    try:
        manifest = json.loads(path.read_text())
        shards, d_in = manifest["shards"], manifest["d_in"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataSourceError(f"{path} is not a valid cache manifest ({err})") from err
    if manifest.get("format_version", 0) > CACHE_FORMAT_VERSION:
        raise DataSourceError(f"{path} has format_version {manifest['format_version']}, newer than "
                              f"{CACHE_FORMAT_VERSION}; upgrade latentpatch")
    if not shards or not isinstance(d_in, int):
        raise DataSourceError(f"{path} lists no shards or no d_in")
    return manifest


class CachedChunks:
    """A `ChunkSource` over a cache: one whole shard per chunk, shards in a new order each epoch."""

    def __init__(self, folder: str | Path, *, seed: int = 0) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.d_in: int = self.manifest["d_in"]
        self._gen = torch.Generator().manual_seed(seed)
        self._epoch, self._index = 0, 0
        self._order = torch.randperm(len(self.manifest["shards"]), generator=self._gen)

    def next_chunk(self) -> Float[Tensor, "token d_in"]:
        if self._index == self._order.shape[0]:
            self._epoch, self._index = self._epoch + 1, 0
            self._order = torch.randperm(len(self.manifest["shards"]), generator=self._gen)
        entry = self.manifest["shards"][int(self._order[self._index])]
        self._index += 1
        return self._read_shard(entry)

    def _read_shard(self, entry: dict[str, Any]) -> Tensor:
        path = self.folder / entry["file"]
        try:
            blob = path.read_bytes()
        except OSError as err:
            raise DataSourceError(f"cannot read cache shard {path} ({err})") from err
        if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            raise DataSourceError(f"cache shard {path}: SHA-256 differs from the manifest (changed or truncated)")
        try:
            rows = read_safetensors(blob, path)["activations"]
        except (SAEFileError, KeyError) as err:
            raise DataSourceError(f"cache shard {path} is malformed ({err})") from err
        if tuple(rows.shape) != (entry["n_tokens"], self.d_in):
            raise DataSourceError(f"cache shard {path} has shape {tuple(rows.shape)}, manifest says "
                                  f"({entry['n_tokens']}, {self.d_in})")
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "index": self._index, "order": self._order.clone(),
                "generator": self._gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._epoch, self._index = int(state["epoch"]), int(state["index"])
        self._order = state["order"].clone()
        self._gen.set_state(state["generator"])

    def describe(self) -> dict[str, Any]:
        return {"source": "cache", "folder": str(self.folder), "n_tokens": self.manifest["n_tokens"],
                "origin": self.manifest.get("source")}


def cached_batches(folder: str | Path, *, batch_size: int, buffer_tokens: int = 131072, seed: int = 0) -> ShuffleBuffer:
    """Shuffled `(batch_size, d_in)` batches from an activation cache, one shard in memory at a time."""
    chunks = CachedChunks(folder, seed=seed)
    return ShuffleBuffer(chunks, batch_size, capacity=max(buffer_tokens, 2 * batch_size), seed=seed)
