"""Activation sources: iterators of `(batch, d_in)` tensors whose position can be saved.

The trainer accepts any iterator of activation batches. Sources defined here also implement
`state_dict()` / `load_state_dict()` (tensors and JSON values only), so a checkpoint records
exactly where the data stream stood, shuffle buffer included, and a resume continues with the
very batches an uninterrupted run would have seen (RELIABILITY.md R9). A plain iterator
without them is resumed by skipping the batches already consumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from sae.metrics import MASSIVE_NORM_RATIO, massive
from training.errors import DataSourceError


@runtime_checkable
class StatefulSource(Protocol):
    """An iterator whose position can be saved and restored."""

    def __next__(self) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class ChunkSource(Protocol):
    """Yields `(n, d_in)` chunks of activations of any length n (a harvest, a cache shard)."""

    d_in: int

    def next_chunk(self) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def describe(self) -> dict[str, Any]: ...


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class TensorBatches:
    """Batches drawn without replacement from activations held in memory, reshuffled each epoch."""

    def __init__(self, activations: Float[Tensor, "token d_in"], batch_size: int, *, seed: int = 0,
                 shuffle: bool = True) -> None:
        if activations.ndim != 2 or activations.shape[0] < batch_size or batch_size <= 0:
            raise DataSourceError(f"TensorBatches needs a (token, d_in) tensor with at least batch_size={batch_size} "
                                  f"rows, got shape {tuple(activations.shape)}")
        self.activations = activations
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.d_in = activations.shape[1]
        self._gen = _generator(seed)
        self._epoch, self._pos = 0, 0
        self._order = self._new_order()

    def _new_order(self) -> Tensor:
        n = self.activations.shape[0]
        return torch.randperm(n, generator=self._gen) if self.shuffle else torch.arange(n)

    def __iter__(self) -> "TensorBatches":
        return self

    def __next__(self) -> Float[Tensor, "batch d_in"]:
        # The last partial batch of an epoch is dropped so that every batch has the same size.
        if self._pos + self.batch_size > self._order.shape[0]:
            self._epoch, self._pos = self._epoch + 1, 0
            self._order = self._new_order()
        index = self._order[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return self.activations[index]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "pos": self._pos, "order": self._order.clone(),
                "generator": self._gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._epoch, self._pos = int(state["epoch"]), int(state["pos"])
        self._order = state["order"].clone()
        self._gen.set_state(state["generator"])

    def describe(self) -> dict[str, Any]:
        return {"source": "tensor", "n_tokens": self.activations.shape[0], "d_in": self.d_in,
                "batch_size": self.batch_size, "shuffle": self.shuffle}


MAX_NORM_RATIO = MASSIVE_NORM_RATIO
"""Suggested `MassiveActivationFilter` threshold (`--max-norm-ratio 10`): `sae.metrics.massive`'s."""


class MassiveActivationFilter:
    """A `ChunkSource` that drops activations whose L2 norm exceeds `max_ratio` x the median norm
    of their chunk. Training keeps every activation unless asked (`--max-norm-ratio`).

    Many transformers write a few "massive activations" into the residual stream (Sun et al. 2024,
    "Massive Activations in Large Language Models"): at SmolLM2-135M's layer 15, 0.02-0.04% of
    real-text tokens have norms of 18,000-25,000 against a median of 152, and they carry 47-72% of
    the summed squared norm. The gap between them and everything else is wide (at 2x the median
    there are only a few more than at 5x), so a generous ratio removes them and nothing else.

    Measured there (L1 1.5, d_sae 2304, 1,966,080 activations, 160 held-out rows): leaving them
    out changed CE loss recovered 0.965 -> 0.966, KL 0.421 -> 0.417 and explained variance without
    massive tokens 0.787 -> 0.789 (L0 73 -> 70), while SAEBench's explained variance, which counts
    them, fell from 0.956 to -4.3: the filtered SAE reconstructs them badly and the model does not
    mind. So it is not the default. Stateless apart from its counts; the inner source's state is
    the state.
    """

    def __init__(self, chunks: ChunkSource, max_ratio: float = MAX_NORM_RATIO) -> None:
        if not max_ratio > 1:
            raise DataSourceError(f"MassiveActivationFilter max_ratio must be > 1 (a multiple of the median norm), "
                                  f"got {max_ratio}")
        self.chunks, self.max_ratio, self.d_in = chunks, float(max_ratio), chunks.d_in
        self.seen, self.dropped = 0, 0

    def next_chunk(self) -> Tensor:
        chunk = self.chunks.next_chunk()
        if chunk.ndim != 2 or chunk.shape[0] == 0:
            return chunk
        keep = ~massive(chunk, self.max_ratio)
        self.seen += chunk.shape[0]
        self.dropped += int((~keep).sum())
        return chunk if bool(keep.all()) else chunk[keep]

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.chunks.state_dict(), "seen": self.seen, "dropped": self.dropped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.chunks.load_state_dict(state["inner"])
        self.seen, self.dropped = int(state["seen"]), int(state["dropped"])

    def describe(self) -> dict[str, Any]:
        return {"source": "massive_activation_filter", "max_norm_ratio": self.max_ratio,
                "chunks": self.chunks.describe()}


def filtered(chunks: ChunkSource, max_norm_ratio: float | None) -> ChunkSource:
    """`chunks` behind a `MassiveActivationFilter`, or as they are when `max_norm_ratio` is None."""
    return chunks if max_norm_ratio is None else MassiveActivationFilter(chunks, max_norm_ratio)


class ShuffleBuffer:
    """Mixes chunks from a `ChunkSource` and serves fixed-size batches.

    Harvested activations come in document order, and neighbouring tokens are highly
    correlated; training on them unshuffled biases every step. As in SAELens's mixing buffer,
    the buffer fills to `capacity` rows, permutes them, serves the first half as batches and
    keeps the second half to mix with the next refill. Memory: at most `capacity` rows plus
    one chunk.
    """

    def __init__(self, chunks: ChunkSource, batch_size: int, *, capacity: int, seed: int = 0) -> None:
        if batch_size <= 0 or capacity < 2 * batch_size:
            raise DataSourceError(f"ShuffleBuffer capacity must be at least 2 * batch_size = {2 * batch_size}, "
                                  f"got capacity={capacity}, batch_size={batch_size}")
        self.chunks = chunks
        self.batch_size = batch_size
        self.capacity = capacity
        self.d_in = chunks.d_in
        self._gen = _generator(seed)
        self._store = torch.empty(0, self.d_in)
        self._out = torch.empty(0, self.d_in)
        self._pos = 0

    def __iter__(self) -> "ShuffleBuffer":
        return self

    def __next__(self) -> Float[Tensor, "batch d_in"]:
        if self._pos + self.batch_size > self._out.shape[0]:
            self._refill()
        batch = self._out[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return batch

    def _refill(self) -> None:
        parts = [self._out[self._pos :], self._store]
        rows = sum(p.shape[0] for p in parts)
        while rows < self.capacity:
            chunk = self.chunks.next_chunk()
            if chunk.ndim != 2 or chunk.shape[1] != self.d_in:
                raise DataSourceError(f"chunk source gave shape {tuple(chunk.shape)}, expected (n, {self.d_in})")
            parts.append(chunk.to(torch.float32))
            rows += chunk.shape[0]
        store = torch.cat(parts)
        store = store[torch.randperm(store.shape[0], generator=self._gen)]
        half = max(self.batch_size, store.shape[0] // 2)
        self._out, self._store, self._pos = store[:half], store[half:], 0

    def state_dict(self) -> dict[str, Any]:
        return {"store": self._store.clone(), "out": self._out[self._pos :].clone(),
                "generator": self._gen.get_state(), "chunks": self.chunks.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._store, self._out, self._pos = state["store"].clone(), state["out"].clone(), 0
        self._gen.set_state(state["generator"])
        self.chunks.load_state_dict(state["chunks"])

    def describe(self) -> dict[str, Any]:
        return {"source": "shuffle_buffer", "batch_size": self.batch_size, "capacity": self.capacity,
                "chunks": self.chunks.describe()}


class RowStripe:
    """This rank's rows of every batch of a global-batch source (data parallelism).

    Rank r of N keeps rows `[r * b, (r + 1) * b)` of each `(N * b, d_in)` batch, so the N ranks
    together see exactly the batches of a single-process run over the same source. Every rank
    reads the whole source, so it suits sources that are cheap to read (in memory, a cache);
    expensive ones (harvesting) stripe their inputs instead (`TokenRows(..., rank=, world_size=)`).
    """

    def __init__(self, batches: Iterator[Tensor], rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise DataSourceError(f"RowStripe rank must be in [0, {world_size}), got {rank}")
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self) -> "RowStripe":
        return self

    def __next__(self) -> Float[Tensor, "batch d_in"]:
        batch = next(self.batches)
        if batch.shape[0] % self.world_size:
            raise DataSourceError(f"global batch of {batch.shape[0]} rows does not split over {self.world_size} ranks")
        rows = batch.shape[0] // self.world_size
        return batch[self.rank * rows : (self.rank + 1) * rows]

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state)

    def describe(self) -> dict[str, Any]:
        inner = self.batches.describe() if hasattr(self.batches, "describe") else type(self.batches).__name__
        return {"source": "row_stripe", "world_size": self.world_size, "batches": inner}


def skip_batches(batches: Iterator[Tensor], n: int) -> None:
    """Advance a plain iterator by `n` batches (how a stateless source is resumed)."""
    for index in range(n):
        try:
            next(batches)
        except StopIteration as err:
            raise DataSourceError(f"the batch iterator ended after {index} batches while skipping the {n} "
                                  "consumed before the checkpoint; resume with the same data") from err
