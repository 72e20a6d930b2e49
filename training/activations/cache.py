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
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from sae.errors import SAEFileError
from sae.files import atomic_write, read_safetensors
from sae.safe_io import UnsafeFileError, read_bytes, read_text
from training.parallel.distributed import Collective
from training.errors import DataSourceError
from training.activations.sources import ChunkSource, ShuffleBuffer, filtered

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CACHE_FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 64 << 20
"""Largest cache manifest read (a shard entry is about 150 bytes)."""
MAX_SHARD_HEADER_BYTES = 1 << 16
"""Slack over a shard's data for its safetensors header (ours are under 200 bytes)."""


class _ShardWriter:
    """Accumulates chunks for one cache folder and writes them as full shards."""

    def __init__(self, folder: str | Path, shard_tokens: int, *, prefix: str = "shard-") -> None:
        self.folder = Path(folder)
        self.prefix = prefix  # per-rank writers of one cache use their own prefix
        if (self.folder / MANIFEST).exists():
            raise DataSourceError(f"{self.folder} already holds an activation cache; choose another folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.pending: list[Tensor] = []
        self.pending_rows = self.written = 0

    def add(self, chunk: Tensor, *, n_tokens: int) -> None:
        self.pending.append(chunk.float())
        self.pending_rows += chunk.shape[0]
        # Write full shards; once enough tokens are in hand, write the remainder too.
        while self.pending_rows >= self.shard_tokens or (self.pending_rows and
                                                         self.written + self.pending_rows >= n_tokens):
            rows = torch.cat(self.pending)
            shard, rest = rows[: self.shard_tokens], rows[self.shard_tokens :]
            self.shards.append(_write_shard(self.folder, f"{self.prefix}{len(self.shards):05d}.safetensors", shard))
            self.written += shard.shape[0]
            self.pending, self.pending_rows = ([rest] if rest.shape[0] else []), rest.shape[0]
            log.info("activation cache %s: %d / %d tokens", self.folder, self.written, n_tokens)

    def finish(self, d_in: int, source: dict[str, Any]) -> Path:
        manifest = {"format_version": CACHE_FORMAT_VERSION, "d_in": d_in, "dtype": "float32",
                    "n_tokens": self.written, "shards": self.shards, "source": source}
        atomic_write(self.folder / MANIFEST, json.dumps(manifest, indent=2).encode())
        return self.folder


def write_activation_cache(chunks: ChunkSource, folder: str | Path, *, n_tokens: int,
                           shard_tokens: int = 65536, collective: Collective | None = None) -> Path:
    """Write at least `n_tokens` activations from `chunks` to `folder` in shards; return it.

    With a `collective`, every rank writes about `n_tokens / world_size` activations of its own
    `chunks` (its stripe) to shards named after it, and rank 0 writes the manifest last, listing
    the ranks' shards interleaved. The folder must be one every rank can write (a shared
    filesystem across nodes).
    """
    folder = Path(folder)
    if (folder / MANIFEST).exists():
        raise DataSourceError(f"{folder} already holds an activation cache; choose another folder")
    folder.mkdir(parents=True, exist_ok=True)
    if collective is None:
        shards = _write_shards(chunks, folder, n_tokens, shard_tokens, prefix="shard-")
    else:
        world = collective.world_size
        own = _write_shards(chunks, folder, -(-n_tokens // world), shard_tokens,
                            prefix=f"shard-r{collective.rank:03d}-")
        gathered = collective.gather_bytes(json.dumps(own).encode())
        if gathered is None:
            collective.barrier()  # returns once rank 0's manifest is on disk
            return folder
        per_rank = [json.loads(part) for part in gathered]
        shards = [rank_shards[i] for i in range(max(map(len, per_rank))) for rank_shards in per_rank
                  if i < len(rank_shards)]
    manifest = {"format_version": CACHE_FORMAT_VERSION, "d_in": chunks.d_in, "dtype": "float32",
                "n_tokens": sum(entry["n_tokens"] for entry in shards), "shards": shards, "source": chunks.describe()}
    atomic_write(folder / MANIFEST, json.dumps(manifest, indent=2).encode())
    if collective is not None:
        collective.barrier()
    return folder


def _write_shards(chunks: ChunkSource, folder: Path, n_tokens: int, shard_tokens: int, *,
                  prefix: str) -> list[dict[str, Any]]:
    """Shards of at least `n_tokens` activations from `chunks`, named `prefix`NNNNN; no manifest."""
    writer = _ShardWriter(folder, shard_tokens, prefix=prefix)
    while writer.written < n_tokens:
        writer.add(chunks.next_chunk(), n_tokens=n_tokens)
    return writer.shards


def write_activation_caches(chunks: Any, folders: dict[str, str | Path], *, n_tokens: int,
                            shard_tokens: int = 65536, progress: Any = None,
                            stop: Callable[[], bool] | None = None) -> dict[str, Path]:
    """One cache per hook from a multi-site source (`MultiSiteChunks`): one forward pass per chunk
    of rows serves every site. `folders` maps hook names to cache folders; `progress` (a tqdm
    bar, optional) advances by the tokens written per site. When `stop()` turns true the tokens in
    hand are written and the caches finished early: each then holds exactly what a run asked for
    that many tokens would hold (its manifest's `n_tokens`)."""
    if set(folders) != set(chunks.hook_names):
        raise DataSourceError(f"cache folders name hooks {sorted(folders)}, the source harvests {chunks.hook_names}")
    writers = {hook: _ShardWriter(folder, shard_tokens) for hook, folder in folders.items()}
    while min(writer.written for writer in writers.values()) < n_tokens:
        before = min(writer.written + writer.pending_rows for writer in writers.values())
        for hook, acts in chunks.next_chunks().items():
            writers[hook].add(acts, n_tokens=n_tokens)
        if progress is not None:
            progress.update(min(writer.written + writer.pending_rows for writer in writers.values()) - before)
        if stop is not None and stop():
            for writer in writers.values():
                writer.add(torch.empty(0, chunks.d_in), n_tokens=writer.written + writer.pending_rows)
            break
    return {hook: writer.finish(chunks.d_in, chunks.describe(hook)) for hook, writer in writers.items()}


def _write_shard(folder: Path, name: str, rows: Tensor) -> dict[str, Any]:
    blob = save_safetensors_bytes({"activations": rows.contiguous()})
    atomic_write(folder / name, blob)
    return {"file": name, "n_tokens": rows.shape[0], "sha256": hashlib.sha256(blob).hexdigest()}


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """A cache's manifest, read through `sae.safe_io` (a FIFO or a link to /dev/zero in its place is
    refused at once), with every shard entry checked: a plain file name, a token count, a digest."""
    path = Path(folder) / MANIFEST
    if not os.path.lexists(path):
        raise DataSourceError(f"{folder} has no {MANIFEST}: not an activation cache, or one never finished")
    try:
        manifest = json.loads(read_text(path, max_bytes=MAX_MANIFEST_BYTES))
        shards, d_in = manifest["shards"], manifest["d_in"]
        bad = [e for e in shards if not (isinstance(e["file"], str) and Path(e["file"]).name == e["file"]
                                         and _is_count(e["n_tokens"]) and isinstance(e["sha256"], str))]
    except UnsafeFileError as err:
        raise DataSourceError(f"cache manifest {err}") from err
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataSourceError(f"{path} is not a valid cache manifest ({type(err).__name__}: {err})") from err
    if manifest.get("format_version", 0) > CACHE_FORMAT_VERSION:
        raise DataSourceError(f"{path} has format_version {manifest['format_version']}, newer than "
                              f"{CACHE_FORMAT_VERSION}; upgrade latentpatch")
    if not shards or not _is_count(d_in) or bad:
        raise DataSourceError(f"{path} lists no shards, no d_in, or a shard entry without a plain file name, "
                              f"token count and sha256: {bad[:1]}")
    return manifest


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class CachedChunks:
    """A `ChunkSource` over one or several caches of the same hook: one whole shard per chunk, the
    shards of all of them in a new order each epoch (so a mix's parts are weighted by their
    tokens).

    With `world_size` > 1 (data parallelism), rank r reads only shards r, r + N, r + 2N, ... of
    them, whatever number of ranks wrote the caches.
    """

    def __init__(self, folder: str | Path | Sequence[str | Path], *, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        folders = [Path(folder)] if isinstance(folder, (str, Path)) else [Path(f) for f in folder]
        if not folders:
            raise DataSourceError("CachedChunks needs at least one cache folder")
        manifests = [read_manifest(f) for f in folders]
        hooks = {m.get("source", {}).get("hook_name") for m in manifests}
        if len({m["d_in"] for m in manifests}) != 1 or len(hooks) != 1:
            raise DataSourceError(f"caches {[str(f) for f in folders]} differ in d_in or hook: "
                                  f"{[(m['d_in'], m.get('source', {}).get('hook_name')) for m in manifests]}")
        self.folder = folders[0]
        self.folders = folders
        self.manifest = manifests[0] if len(manifests) == 1 else {
            "d_in": manifests[0]["d_in"], "n_tokens": sum(m["n_tokens"] for m in manifests),
            "source": {"hook_name": hooks.pop(), "parts": [m.get("source") for m in manifests]}}
        everything = [(f, entry) for f, m in zip(folders, manifests) for entry in m["shards"]]
        self.world_size = world_size
        self._entries = everything[rank::world_size]
        if not 0 <= rank < world_size or not self._entries:
            raise DataSourceError(f"activation cache(s) {[str(f) for f in folders]} hold {len(everything)} shard(s): "
                                  f"rank {rank} of {world_size} gets none; write a cache with more, smaller shards")
        self.d_in: int = self.manifest["d_in"]
        self._gen = torch.Generator().manual_seed(seed)
        self._epoch, self._index = 0, 0
        self._order = torch.randperm(len(self._entries), generator=self._gen)

    def next_chunk(self) -> Float[Tensor, "token d_in"]:
        if self._index == self._order.shape[0]:
            self._epoch, self._index = self._epoch + 1, 0
            self._order = torch.randperm(len(self._entries), generator=self._gen)
        folder, entry = self._entries[int(self._order[self._index])]
        self._index += 1
        return self._read_shard(folder, entry)

    def _read_shard(self, folder: Path, entry: dict[str, Any]) -> Tensor:
        path = folder / entry["file"]
        # float32 rows as the manifest counts them, plus the header: a larger file is not this shard.
        bound = 4 * entry["n_tokens"] * self.d_in + MAX_SHARD_HEADER_BYTES
        try:
            blob = read_bytes(path, max_bytes=bound)
        except UnsafeFileError as err:
            raise DataSourceError(f"cannot read cache shard {err}") from err
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
        described = {"source": "cache", "folder": ", ".join(str(f) for f in self.folders),
                     "n_tokens": self.manifest["n_tokens"], "origin": self.manifest.get("source")}
        return described if self.world_size == 1 else {**described, "stripe_of": self.world_size}


def cached_batches(folder: str | Path | Sequence[str | Path], *, batch_size: int, buffer_tokens: int = 131072,
                   seed: int = 0, rank: int = 0, world_size: int = 1,
                   max_norm_ratio: float | None = None) -> ShuffleBuffer:
    """Shuffled `(batch_size, d_in)` batches from an activation cache, one shard in memory at a time.
    The cache holds every activation; those over `max_norm_ratio` x their shard's median norm are
    left out here when `max_norm_ratio` is given (`MassiveActivationFilter`; None keeps them)."""
    chunks = filtered(CachedChunks(folder, seed=seed + rank, rank=rank, world_size=world_size), max_norm_ratio)
    return ShuffleBuffer(chunks, batch_size, capacity=max(buffer_tokens, 2 * batch_size), seed=seed + rank)
