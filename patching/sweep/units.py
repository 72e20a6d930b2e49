"""Patch units: what one patched run changes, and how a sweep enumerates them.

A unit is one or more parts; a part names a site, a kind (`latent`, `error` or `raw`), base
positions and latents (None meaning all of them). The sweep turns a unit into element
coordinates for one pair, keeping only elements whose source and base values differ: only
those can have an effect (DESIGN.md, Patching).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
from torch import Tensor

from patching.errors import PatchingError
from patching.model.checks import check_latent_indices
from patching.model.sites import HEAD_KINDS, Site, as_site

PartKind = Literal["latent", "error", "raw"]
UnitKind = Literal["latent_position", "latent", "position", "error", "joint"]
UNIT_KINDS: tuple[str, ...] = ("latent_position", "latent", "position", "error", "joint")
LatentSet = Union[Sequence[int], Mapping[Union[Site, str], Sequence[int]]]


@dataclass(frozen=True)
class UnitPart:
    """One site's share of a unit."""

    site: Site
    """Where the patch applies."""
    kind: PartKind
    """`latent` (SAE latents), `error` (the SAE error node) or `raw` (the site's raw activation)."""
    positions: tuple[int, ...] | None
    """Base-run positions; None for every considered position."""
    latents: tuple[int, ...] | None = None
    """Latent indices (`latent` parts) or dimensions / neurons (`raw` parts); None for all."""


@dataclass(frozen=True)
class PatchUnit:
    """What one patched run changes: the union of its parts."""

    parts: tuple[UnitPart, ...]
    """The parts, patched jointly."""

    @property
    def start_layer(self) -> int:
        return min(part.site.layer for part in self.parts)

    def _single(self, attribute: str) -> object:
        values = {getattr(part, attribute) for part in self.parts}
        return values.pop() if len(values) == 1 else None

    @property
    def site(self) -> Site | None:
        return self._single("site")  # type: ignore[return-value]

    @property
    def kind(self) -> str:
        return str(self._single("kind") or "mixed")

    @property
    def position(self) -> int | None:
        positions = self._single("positions")
        return positions[0] if isinstance(positions, tuple) and len(positions) == 1 else None

    @property
    def latent(self) -> int | None:
        latents = self._single("latents")
        return latents[0] if isinstance(latents, tuple) and len(latents) == 1 else None

    def label(self) -> str:
        return " + ".join(
            f"{part.site.hook_name}{'' if part.site.head is None else f'[{part.site.head}]'}:{part.kind}"
            + ("" if part.positions is None else f"@{','.join(map(str, part.positions))}")
            + ("" if part.latents is None else f"#{','.join(map(str, part.latents[:8]))}{'…' if len(part.latents) > 8 else ''}")
            for part in self.parts
        )


def differing_units(kind: str, differs: Mapping[Site, Tensor], positions: tuple[int, ...] | None,
                    latent_sets: Sequence[LatentSet] | None) -> list[PatchUnit]:
    """Units of `kind` over every site; `differs[site]` is a (pos, d_sae) mask, any pair."""
    if kind not in UNIT_KINDS:
        raise PatchingError(f"unit must be one of {UNIT_KINDS}, got {kind!r}")
    if kind == "joint":
        return joint_units(latent_sets, {site: mask.shape[1] for site, mask in differs.items()}, positions)
    if latent_sets is not None:
        raise PatchingError("latent_sets is only used with units='joint'")
    units: list[PatchUnit] = []
    for site, mask in differs.items():
        mask = mask & position_mask(mask.shape[0], positions)[:, None]
        if kind == "latent_position":
            for p, latent in torch.nonzero(mask).tolist():
                units.append(PatchUnit((UnitPart(site, "latent", (p,), (latent,)),)))
        elif kind == "latent":
            for latent in torch.nonzero(mask.any(0)).flatten().tolist():
                units.append(PatchUnit((UnitPart(site, "latent", positions, (latent,)),)))
        elif kind == "position":
            for p in torch.nonzero(mask.any(1)).flatten().tolist():
                units.append(PatchUnit((UnitPart(site, "latent", (p,), None),)))
        else:
            for p in (positions if positions is not None else range(mask.shape[0])):
                units.append(PatchUnit((UnitPart(site, "error", (p,)),)))
    return units


def head_units(model: Any, kind: str, layers: Sequence[int], by: Literal["all", "position"],
               positions: Sequence[int]) -> list[PatchUnit]:
    """One raw unit per head of `kind` per layer (`by="all"`: every position; `"position"`: one
    position each), ordered (layer, head) or (layer, position, head) as TransformerLens's
    `get_act_patch_attn_head_*` functions lay out their results."""
    if kind not in HEAD_KINDS:
        raise PatchingError(f"head units take a per-head kind {HEAD_KINDS}, got {kind!r}")
    if by not in ("all", "position"):
        raise PatchingError(f"by must be 'all' or 'position', got {by!r}")
    units = []
    for layer in layers:
        heads = range(Site(layer, kind, head=0).n_heads(model))
        if by == "all":
            units += [PatchUnit((UnitPart(Site(layer, kind, head=h), "raw", None),)) for h in heads]
        else:
            units += [PatchUnit((UnitPart(Site(layer, kind, head=h), "raw", (p,)),)) for p in positions for h in heads]
    return units


def joint_units(latent_sets: Any, widths: Mapping[Site, int],
                positions: tuple[int, ...] | None) -> list[PatchUnit]:
    """One unit per latent set; `widths` gives each site's d_sae, against which every index is checked."""
    sites = list(widths)
    if not latent_sets:
        raise PatchingError("units='joint' needs latent_sets: a list of latent lists (or {site: latents} dicts)")
    units = []
    for i, latent_set in enumerate(latent_sets):
        if isinstance(latent_set, Mapping):
            by_site = {as_site(site): latents for site, latents in latent_set.items()}
        elif len(sites) == 1:
            by_site = {sites[0]: latent_set}
        else:
            raise PatchingError(f"latent_sets[{i}]: with SAEs at several sites each set must be a {{site: latents}} dict")
        parts = []
        for site, latents in by_site.items():
            if site not in sites:
                raise PatchingError(f"latent_sets[{i}] names {site}, but SAEs are at {[str(s) for s in sites]}")
            items = check_latent_indices(latents, widths[site], name=f"latent_sets[{i}] at {site}")
            parts.append(UnitPart(site, "latent", positions, items))
        units.append(PatchUnit(tuple(parts)))
    return units


def position_mask(n_pos: int, positions: Sequence[int] | None) -> Tensor:
    """(n_pos,) bool: the positions kept (all when None; positions at or beyond n_pos are left out)."""
    if positions is None:
        return torch.ones(n_pos, dtype=torch.bool)
    keep = torch.zeros(n_pos, dtype=torch.bool)
    keep[[p for p in positions if 0 <= p < n_pos]] = True
    return keep
