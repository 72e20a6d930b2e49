"""Neurons and residual directions as mixtures of SAE latents.

An MLP neuron's pre-activation is affine in its norm's output. With `u` the neuron's input
weights (the norm's weight folded in, and for a LayerNorm the centering folded in as
`u - mean(u)`), `s(x)` the norm's per-token scale and `c` the bias,
`pre = (u · x) / s(x) + c`. An SAE at the MLP's input site (`resid_mid`, or `resid_pre` with
parallel attention) writes `x = Σ_i z_i W_dec[i] + b_dec + e`, so, exactly,

    pre = Σ_i z_i (u · W_dec[i]) / s + (u · b_dec) / s + (u · e) / s + c.

A residual direction `d` at a residual site is the same with `s = 1`, `c = 0`. Per context this
names the latents that drive the neuron; over a corpus each term's share of the neuron's variance
is `Cov(term, pre) / Var(pre)` (the shares sum to 1 because the terms sum to `pre`). Grouping a
neuron's top contexts by their dominant latent is the picture of polysemanticity (Elhage et al.
2022, "Toy Models of Superposition"; Bricken et al. 2023, "Towards Monosemanticity").
The "b_dec" term is `u · (decode(z) - z W_dec) / s`, which is `u · b_dec / s` for a standard SAE
and keeps the sum exact for any SAE whose decoder adds more than `b_dec`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from patching.errors import PatchingError
from patching.model import tl_compat
from patching.model.sites import Site
from patching.splice.splicer import SpliceChecks
from sae.deprecation import renamed_attributes

NeuronHook = Literal["mlp_pre", "mlp_post"]
RESIDUAL_KINDS = ("resid_pre", "resid_mid", "resid_post")


@dataclass(frozen=True)
class Neuron:
    """One MLP hidden unit."""

    layer: int
    """Block index."""
    index: int
    """Hidden unit, in `0..d_mlp-1`."""
    hook: NeuronHook = "mlp_post"
    """Which activation ranks its contexts: `mlp_post` (after the nonlinearity; for a gated MLP,
    act(gate) * linear) or `mlp_pre` (the (gate) pre-activation, which the decomposition explains)."""

    def __post_init__(self) -> None:
        for name in ("layer", "index"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PatchingError(f"Neuron.{name} must be a non-negative int, got {value!r}")
        if self.hook not in ("mlp_pre", "mlp_post"):
            raise PatchingError(f"Neuron.hook must be 'mlp_pre' or 'mlp_post', got {self.hook!r}")

    @property
    def site(self) -> Site:
        return Site(self.layer, self.hook)

    @property
    def label(self) -> str:
        return f"L{self.layer}N{self.index}"


@dataclass(frozen=True, eq=False)
class NeuronDirection:
    """A residual-stream direction at a site, inspected like a neuron: its activation is `vector · x`.

    Named apart from `direction=` of the patching functions ("denoise" or "noise"); the old name
    `Direction` still works for one release, with a `DeprecationWarning`."""

    site: Site
    """A residual site (`resid_pre`, `resid_mid`, `resid_post`)."""
    vector: Tensor
    """`(d_model,)`, finite."""
    name: str = "direction"
    """Shown in reports and file names."""

    def __post_init__(self) -> None:
        if not isinstance(self.site, Site) or self.site.kind not in RESIDUAL_KINDS:
            raise PatchingError(f"NeuronDirection.site must be a residual Site ({', '.join(RESIDUAL_KINDS)}), got {self.site!r}")
        if not isinstance(self.vector, Tensor) or self.vector.dim() != 1 or not torch.isfinite(self.vector).all():
            raise PatchingError(f"NeuronDirection.vector must be a finite 1-d tensor, got {getattr(self.vector, 'shape', self.vector)!r}")

    @property
    def label(self) -> str:
        return f"{self.name}@{self.site.hook_name}"


Unit = Neuron | NeuronDirection


class Readout(NamedTuple):
    """A unit's (pre-)activation as a function of the residual stream at `site`."""

    site: Site
    """Where the SAE must sit: the residual stream the unit reads."""
    u: Tensor
    """`(d_model,)`: effective input weights (norm weight and centering folded in)."""
    constant: float
    """Bias added after the scale."""
    norm: str
    """`ln`, `rms` or `none`: how the per-token scale `s(x)` is computed."""
    eps: float
    """The norm's epsilon."""

    def scale(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "..."]:
        """The norm's per-token scale `s(x)` (1 without a norm)."""
        if self.norm == "none":
            return torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device)
        centered = x - x.mean(-1, keepdim=True) if self.norm == "ln" else x
        return (centered.pow(2).mean(-1) + self.eps).sqrt()

    def __call__(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "..."]:
        return (x @ self.u.to(x.dtype)) / self.scale(x) + self.constant


def check_units(model: Any, units: Sequence[Unit]) -> tuple[Unit, ...]:
    """Units that exist in `model` (layers, neuron indices, vector widths), else `PatchingError`."""
    items = tuple(units)
    if not items:
        raise PatchingError("give at least one unit (a Neuron or a NeuronDirection)")
    for unit in items:
        if isinstance(unit, Neuron):
            unit.site.check(model)
            width = unit.site.width(model)
            if unit.index >= width:
                raise PatchingError(f"{unit.label}: neuron index {unit.index} out of range; layer {unit.layer} has d_mlp={width}")
        elif isinstance(unit, NeuronDirection):
            unit.site.check(model)
            if unit.vector.shape[0] != tl_compat.d_model(model):
                raise PatchingError(f"{unit.label}: vector has {unit.vector.shape[0]} entries, expected d_model="
                                    f"{tl_compat.d_model(model)}")
        else:
            raise PatchingError(f"units must be Neuron or NeuronDirection values, got {type(unit).__name__}")
    return items


def readout(model: Any, unit: Unit) -> Readout:
    """The unit's pre-activation as an affine function of the (normalized) residual stream."""
    if isinstance(unit, NeuronDirection):
        return Readout(unit.site, unit.vector.detach(), 0.0, "none", 0.0)
    try:
        weight, bias, norm, eps = tl_compat.mlp_pre_affine(model, unit.layer)
    except ValueError as err:
        raise PatchingError(f"{unit.label}: {err}") from err
    u = weight[:, unit.index]
    if norm == "ln":  # (u · (x - mean x)) = ((u - mean u) · x): the centering folds into u
        u = u - u.mean()
    return Readout(Site(unit.layer, tl_compat.mlp_input_kind(model)), u, float(bias[unit.index]), norm, eps)


def output_direction(model: Any, unit: Unit) -> Tensor:
    """What the unit writes to the residual stream: a neuron's `W_out` row, or the direction."""
    return tl_compat.mlp_out_weight(model, unit.layer)[unit.index] if isinstance(unit, Neuron) else unit.vector


class Decomposition(NamedTuple):
    """The terms of a unit's pre-activation; `latents.sum(-1) + b_dec + error + constant == total`."""

    latents: Float[Tensor, "... d_sae"]
    """`z_i (u · W_dec[i]) / s` per latent."""
    b_dec: Float[Tensor, "..."]
    """`u · (decode(z) - z W_dec) / s` (= `u · b_dec / s` for a standard SAE)."""
    error: Float[Tensor, "..."]
    """`u · (x - decode(z)) / s`, the part the SAE does not reconstruct."""
    constant: float
    """The unit's bias (0 for a direction)."""
    total: Float[Tensor, "..."]
    """The pre-activation itself, `(u · x) / s + constant`."""


def latent_weights(sae: Any, read: Readout, dtype: torch.dtype = torch.float32) -> Float[Tensor, " d_sae"]:
    """`u · W_dec[i]` for every latent: how much a unit of latent i moves the unit (before 1/s)."""
    return sae.W_dec.detach().to(dtype) @ read.u.to(sae.W_dec.device, dtype)


def decompose(sae: Any, read: Readout, x: Float[Tensor, "... d_model"]) -> Decomposition:
    """Split the unit's pre-activation at residual activations `x` into latent, bias and error terms."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # fp64 in, fp64 out (exactness tests)
    x = x.to(dtype)
    z = sae.encode(x).to(dtype)
    x_hat = sae.decode(z).to(dtype)
    inv = 1.0 / read.scale(x)
    u = read.u.to(x.device, dtype)
    latents = z * latent_weights(sae, read, dtype) * inv[..., None]
    b_dec = ((x_hat - z @ sae.W_dec.to(dtype)) @ u) * inv
    error = ((x - x_hat) @ u) * inv
    return Decomposition(latents, b_dec, error, read.constant, read(x))


def check_sae_site(model: Any, sae: Any, site: Site | None, reads: Sequence[Readout], *,
                   checks: SpliceChecks | None = None) -> tuple[Site, Any]:
    """The SAE (validated like a splice) must sit where every unit reads the residual stream."""
    from patching.splice.collect import resolve_site

    found, adapted = resolve_site(model, sae, site, checks=checks)
    wrong = sorted({str(r.site) for r in reads if r.site != found})
    if wrong:
        raise PatchingError(f"the units read the residual stream at {wrong}, but the SAE is at {found}; decomposing "
                            "them needs an SAE at that site (an MLP reads resid_mid of its own block)")
    return found, adapted


class TopContexts(NamedTuple):
    """The k largest activations of each of `n` units over a corpus (ties: earlier first)."""

    values: Float[Tensor, "k n"]
    """Activations, largest first; -inf where fewer than k positions were counted."""
    rows: Tensor
    """`(k, n)` corpus rows."""
    positions: Tensor
    """`(k, n)` positions in the rows."""
    tokens: Tensor
    """`(k, n)` token ids at those positions (-1 where none)."""


class TopKTracker:
    """Running top-k positions per unit over a stream of rows, in tensors (thousands of units)."""

    def __init__(self, k: int, n_units: int) -> None:
        self.k = k
        self.values = torch.full((0, n_units), -math.inf)
        self.meta = torch.zeros(0, n_units, 3, dtype=torch.long)  # row, position, token

    def update(self, row: int, tokens: Tensor, values: Float[Tensor, "pos n"], keep: Tensor) -> Tensor:
        """Merge one row's values; returns the (kept, n) indices into the row that entered the top k
        (positions, or -1) so that callers can store payloads."""
        values = values.masked_fill(~keep[:, None], -math.inf)
        n_pos, n_units = values.shape
        meta = torch.stack([torch.full_like(tokens, row), torch.arange(n_pos), tokens], -1)  # (pos, 3)
        merged = torch.cat([self.values, values])  # (k_old + pos, n)
        order = _stable_top(merged, self.k)
        self.values = merged.gather(0, order)
        self.meta = torch.cat([self.meta, meta[:, None].expand(n_pos, n_units, 3)]).gather(
            0, order[..., None].expand(-1, -1, 3))
        old = merged.shape[0] - n_pos
        return torch.where(order >= old, order - old, torch.full_like(order, -1))

    def result(self) -> TopContexts:
        tokens = torch.where(torch.isfinite(self.values), self.meta[..., 2], torch.full_like(self.meta[..., 2], -1))
        return TopContexts(self.values, self.meta[..., 0], self.meta[..., 1], tokens)


def _stable_top(values: Tensor, k: int) -> Tensor:
    """Indices of the k largest along dim 0, earlier indices first among equal values."""
    order = torch.sort(values, dim=0, descending=True, stable=True).indices
    return order[: min(k, values.shape[0])]


def token_concentration(tokens: Sequence[int] | Sequence[str]) -> float | None:
    """`1 - H / log N` of the token ids at a unit's top N contexts: 1 when every one is the same
    token, 0 when all differ. None for fewer than two contexts. The same formula for neurons and
    latents, so "latents are cleaner" is measured, not assumed (Bricken et al. 2023 use token
    specificity the same way)."""
    items = list(tokens)
    if len(items) < 2:
        return None
    counts = torch.tensor(list({t: items.count(t) for t in items}.values()), dtype=torch.float64)
    p = counts / counts.sum()
    return float(1.0 - (-(p * p.log()).sum()) / math.log(len(items)))


def group_by_dominant(dominant: Sequence[int]) -> list[tuple[int, list[int]]]:
    """`(latent, [context indices])` groups, largest group first (then by first appearance)."""
    groups: dict[int, list[int]] = {}
    for i, latent in enumerate(dominant):
        groups.setdefault(int(latent), []).append(i)
    return sorted(groups.items(), key=lambda item: (-len(item[1]), item[1][0]))


def cluster_concentration(dominant: Sequence[int]) -> float | None:
    """Fraction of a unit's top contexts whose dominant latent is the most common one."""
    groups = group_by_dominant(dominant)
    return len(groups[0][1]) / len(dominant) if groups else None


__getattr__ = renamed_attributes(__name__, {"Direction": lambda: NeuronDirection})
