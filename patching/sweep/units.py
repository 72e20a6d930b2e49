"""Patch units: what one patched run changes, and how a sweep enumerates them.

A unit is one or more parts; a part names a site, a kind (`latent`, `error` or `raw`), base
positions and latents (None meaning all of them). The sweep turns a unit into element
coordinates for one pair, keeping only elements whose source and base values differ: only
those can have an effect (DESIGN.md, Patching).

How a sweep enumerates its units (`patch_latents(units="position")`) is a table of unit kinds:
each kind is one function from a site and the mask of its latents that differ to the units at
that site. Adding a kind is one registration, for example each latent that differs at the last
position, patched there alone:

```python
from patching.sweep import PatchUnit, UnitPart, register_unit_kind


def last_position_latents(site, differs, positions):
    # differs: (pos, d_sae) bool, the latents that differ in some pair at each kept position
    last = differs.shape[0] - 1
    return [PatchUnit((UnitPart(site, "latent", (last,), (latent,)),))
            for latent in differs[last].nonzero().flatten().tolist()]


register_unit_kind("latent_last", last_position_latents)
# patch_latents(model, sae, clean, corrupted, metric, units="latent_last")
```
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
from torch import Tensor

from patching.errors import PatchingError
from patching.model.checks import check_latent_indices
from patching.model.sites import HEAD_KINDS, Site, as_site

PartKind = Literal["latent", "error", "raw"]
UnitKind = str
"""A registered unit kind (`unit_kinds()`), or `joint` (one unit per given latent set)."""
UnitEnumerator = Callable[[Site, Tensor, "tuple[int, ...] | None"], "list[PatchUnit]"]
"""`(site, differs, positions) -> units at site`; `differs` is the (pos, d_sae) bool mask of the
latents that differ in some pair, already restricted to `positions` (None: every position)."""
UNIT_KIND_TABLE: dict[str, UnitEnumerator] = {}
"""The unit kinds a sweep enumerates by name; `register_unit_kind` adds one."""
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


def register_unit_kind(name: str, enumerate_units: UnitEnumerator) -> None:
    """Make `patch_latents(units=name)` enumerate units with `enumerate_units` (see the module
    docstring); a name already taken, or not an identifier, is refused."""
    if not isinstance(name, str) or not name.isidentifier() or name == "joint":
        raise PatchingError(f"a unit kind's name must be an identifier other than 'joint', got {name!r}")
    if name in UNIT_KIND_TABLE:
        raise PatchingError(f"unit kind {name!r} is already registered (to {UNIT_KIND_TABLE[name].__name__})")
    if not callable(enumerate_units):
        raise PatchingError(f"unit kind {name!r}: expected a function (site, differs, positions) -> units")
    UNIT_KIND_TABLE[name] = enumerate_units


def unit_kinds() -> tuple[str, ...]:
    """Every unit kind `patch_latents(units=...)` takes by name: the registered ones and `joint`."""
    return (*UNIT_KIND_TABLE, "joint")


def check_unit_kind(kind: Any) -> str:
    if kind not in unit_kinds():
        raise PatchingError(f"units must be a list of PatchUnit values or a kind, one of {unit_kinds()}; got {kind!r}")
    return kind


def differing_units(kind: str, differs: Mapping[Site, Tensor], positions: tuple[int, ...] | None,
                    latent_sets: Sequence[LatentSet] | None) -> list[PatchUnit]:
    """Units of `kind` over every site; `differs[site]` is a (pos, d_sae) mask, any pair."""
    check_unit_kind(kind)
    if kind == "joint":
        return joint_units(latent_sets, {site: mask.shape[1] for site, mask in differs.items()}, positions)
    if latent_sets is not None:
        raise PatchingError("latent_sets is only used with units='joint'")
    enumerate_units = UNIT_KIND_TABLE[kind]
    units: list[PatchUnit] = []
    for site, mask in differs.items():
        units += enumerate_units(site, mask & position_mask(mask.shape[0], positions)[:, None], positions)
    return units


def _latent_position(site: Site, differs: Tensor, positions: tuple[int, ...] | None) -> list[PatchUnit]:
    """Each differing latent at each position, alone."""
    return [PatchUnit((UnitPart(site, "latent", (p,), (latent,)),)) for p, latent in torch.nonzero(differs).tolist()]


def _latent(site: Site, differs: Tensor, positions: tuple[int, ...] | None) -> list[PatchUnit]:
    """Each differing latent at every kept position at once."""
    return [PatchUnit((UnitPart(site, "latent", positions, (latent,)),))
            for latent in torch.nonzero(differs.any(0)).flatten().tolist()]


def _position(site: Site, differs: Tensor, positions: tuple[int, ...] | None) -> list[PatchUnit]:
    """Every latent at one position, for each position where any differs."""
    return [PatchUnit((UnitPart(site, "latent", (p,), None),)) for p in torch.nonzero(differs.any(1)).flatten().tolist()]


def _error(site: Site, differs: Tensor, positions: tuple[int, ...] | None) -> list[PatchUnit]:
    """The SAE's error node at each kept position."""
    return [PatchUnit((UnitPart(site, "error", (p,)),)) for p in (positions if positions is not None else range(differs.shape[0]))]


for _name, _enumerate in (("latent_position", _latent_position), ("latent", _latent), ("position", _position),
                          ("error", _error)):
    register_unit_kind(_name, _enumerate)


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
