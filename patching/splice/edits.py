"""LatentEdit: a typed intervention on an SAE's latents at one site."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Union

import torch
from jaxtyping import Float
from torch import Tensor

from patching.errors import SpliceError
from patching.model.sites import Site, as_site

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
    raw = index.flatten().tolist() if isinstance(index, Tensor) else list(index) if isinstance(index, Sequence) else [index]
    try:
        items = tuple(operator.index(i) for i in raw if not isinstance(i, bool))
    except TypeError:
        items = ()
    if not items or len(items) != len(raw) or min(items) < 0:
        raise SpliceError(f"LatentEdit.{name} must be None or non-negative ints (no negative indices), got {index!r}")
    return items


def _index_tensor(index: tuple[int, ...] | None, size: int, device: torch.device) -> Tensor:
    if index is None:
        return torch.arange(size, device=device)
    return torch.tensor(index, device=device, dtype=torch.long)


@dataclass(frozen=True)
class LatentPatch:
    """Element-wise latent assignment: `z[batch[i], positions[i], latents[i]] = values[i]`.

    The vectorised form sweeps use: one value carries thousands of single-latent patches, each
    on its own batch row. All four tensors are 1-D of equal length.
    """

    site: Site
    """Where the SAE sits."""
    batch: Tensor
    """Batch row of each element (long)."""
    positions: Tensor
    """Token position of each element (long)."""
    latents: Tensor
    """Latent index of each element (long)."""
    values: Tensor
    """New value of each element."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "site", as_site(self.site))
        _check_coordinates(self, ("batch", "positions", "latents"))

    def check_latents(self, d_sae: int) -> None:
        if self.latents.numel() and int(self.latents.max()) >= d_sae:
            raise SpliceError(f"{self.site}: latent index {int(self.latents.max())} out of range for d_sae={d_sae}")

    def apply_(self, z: Float[Tensor, "batch pos d_sae"], at: tuple[Tensor, Tensor] | None = None) -> None:
        """Assign the elements in `z` in place; `at`: their (rows, positions) in `z` when `z` holds
        only some tokens (the splicer's touched tokens), instead of `batch` and `positions`."""
        if at is None:
            check_bounds(self.site, z.shape[:2], self.batch, self.positions)
        rows, positions = (self.batch, self.positions) if at is None else at
        z[rows, positions, self.latents] = self.values.to(z.dtype)


@dataclass(frozen=True)
class ErrorPatch:
    """Replace the SAE error term `e = x - decode(z)` at given rows and positions.

    In error-term mode the site outputs `x + decode_delta(z', z) + (values - e)` at those
    elements, so patching the error of the other run is exact. Refused in bottleneck mode.
    """

    site: Site
    """Where the SAE sits."""
    batch: Tensor
    """Batch row of each element (long)."""
    positions: Tensor
    """Token position of each element (long)."""
    values: Float[Tensor, "n d_in"]
    """The error vector to install at each element."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "site", as_site(self.site))
        _check_coordinates(self, ("batch", "positions"))

    def check_latents(self, d_sae: int) -> None:
        """Errors carry no latent index (present so that every edit is validated alike)."""

    def delta(self, error: Float[Tensor, "batch pos d_in"], at: tuple[Tensor, Tensor] | None = None) -> Float[Tensor, "batch pos d_in"]:
        """`values - e` at the patched elements, zero elsewhere; `at` as in `LatentPatch.apply_`."""
        if at is None:
            check_bounds(self.site, error.shape[:2], self.batch, self.positions)
        rows, positions = (self.batch, self.positions) if at is None else at
        out = torch.zeros_like(error)
        out[rows, positions] = self.values.to(error.dtype) - error[rows, positions]
        return out


def _check_coordinates(edit: object, names: tuple[str, ...]) -> None:
    tensors = [getattr(edit, name) for name in names] + [edit.values]  # type: ignore[attr-defined]
    if not all(isinstance(t, Tensor) for t in tensors):
        raise SpliceError(f"{type(edit).__name__}: {names} and values must be tensors")
    n = tensors[0].shape[0] if tensors[0].dim() == 1 else -1
    for name, t in zip(names, tensors):
        if t.dim() != 1 or t.shape[0] != n or t.dtype != torch.long:
            raise SpliceError(f"{type(edit).__name__}.{name} must be a 1-D long tensor of length {n}, got {tuple(t.shape)} {t.dtype}")
        if n and int(t.min()) < 0:
            raise SpliceError(f"{type(edit).__name__}.{name} holds negative indices")
    values = tensors[-1]
    if values.shape[0] != n or not torch.isfinite(values).all():
        raise SpliceError(f"{type(edit).__name__}.values must hold {n} finite entries, got shape {tuple(values.shape)}")


def check_bounds(site: Site, shape: tuple[int, ...], batch: Tensor, positions: Tensor) -> None:
    for name, index, size in (("batch", batch, shape[0]), ("positions", positions, shape[1])):
        if index.numel() and int(index.max()) >= size:
            raise SpliceError(f"{site}: {name} index {int(index.max())} out of range for size {size}")
