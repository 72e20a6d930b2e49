"""LatentEdit: a typed intervention on an SAE's latents at one site."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence
from typing import Literal, Union

import torch
from jaxtyping import Float
from torch import Tensor

from patching.errors import SpliceError
from patching.sites import Site, as_site

EditMode = Literal["set", "add", "scale"]
EDIT_MODES: tuple[str, ...] = ("set", "add", "scale")
Index = Union[int, Sequence[int], None]


@dataclass(frozen=True)
class LatentEdit:
    """Set, add to or scale latents of the SAE at `site`.

    The edit touches `z[batch, positions, latents]` (each `None` meaning all of that axis,
    taken as an outer product). `value` is a number or a tensor broadcastable to the selected
    block `(n_batch, n_positions, n_latents)`, e.g. clean-run latents for a patch.
    """

    site: Site
    """Where the SAE sits (a Site or a hook name)."""
    latents: Index
    """Latent index or indices; None for every latent."""
    value: float | Tensor
    """The new value (`set`), the increment (`add`) or the factor (`scale`)."""
    mode: EditMode = "set"
    """How `value` is applied."""
    positions: Index = None
    """Token positions; None for every position."""
    batch: Index = None
    """Batch rows; None for every row."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "site", as_site(self.site))
        for name in ("latents", "positions", "batch"):
            object.__setattr__(self, name, _as_index(name, getattr(self, name)))
        if self.mode not in EDIT_MODES:
            raise SpliceError(f"LatentEdit.mode must be one of {EDIT_MODES}, got {self.mode!r}")
        if isinstance(self.value, Tensor):
            if not torch.is_floating_point(self.value) or not torch.isfinite(self.value).all():
                raise SpliceError("LatentEdit.value must be a finite floating-point tensor")
        elif isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
            raise SpliceError(f"LatentEdit.value must be a number or a tensor, got {type(self.value).__name__}")
        elif not torch.isfinite(torch.tensor(float(self.value))):
            raise SpliceError(f"LatentEdit.value must be finite, got {self.value}")

    def check_latents(self, d_sae: int) -> None:
        if self.latents is not None and max(self.latents) >= d_sae:
            raise SpliceError(f"{self.site}: latent index {max(self.latents)} out of range for d_sae={d_sae}")

    def apply_(self, z: Float[Tensor, "batch pos d_sae"]) -> None:
        """Apply the edit to `z` in place (callers pass a copy)."""
        n_batch, n_pos, d_sae = z.shape
        for name, index, size in (("batch", self.batch, n_batch), ("positions", self.positions, n_pos)):
            if index is not None and max(index) >= size:
                raise SpliceError(f"{self.site}: {name} index {max(index)} out of range for size {size}")
        b = _index_tensor(self.batch, n_batch, z.device)[:, None, None]
        p = _index_tensor(self.positions, n_pos, z.device)[None, :, None]
        lat = _index_tensor(self.latents, d_sae, z.device)[None, None, :]
        value = self.value.to(z.dtype) if isinstance(self.value, Tensor) else self.value
        if self.mode == "set":
            z[b, p, lat] = torch.broadcast_to(torch.as_tensor(value, dtype=z.dtype, device=z.device), z[b, p, lat].shape)
        elif self.mode == "add":
            z[b, p, lat] = z[b, p, lat] + value
        else:
            z[b, p, lat] = z[b, p, lat] * value


def _as_index(name: str, index: Index) -> tuple[int, ...] | None:
    if index is None:
        return None
    items = (index,) if isinstance(index, int) else tuple(index)
    if not items or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in items):
        raise SpliceError(f"LatentEdit.{name} must be None or non-negative ints (no negative indices), got {index!r}")
    return items


def _index_tensor(index: tuple[int, ...] | None, size: int, device: torch.device) -> Tensor:
    if index is None:
        return torch.arange(size, device=device)
    return torch.tensor(index, device=device, dtype=torch.long)
