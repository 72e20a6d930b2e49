"""Inspecting neurons and residual directions through an SAE: one pass over a corpus gives each
unit's top contexts, activation histogram, output logit effect, per-context latent decomposition,
variance shares over the corpus, grouping of its top contexts by dominant latent and
monosemanticity scores. `unit_scores` scores every neuron of a layer and every latent of the SAE
with the same formula (the polysemanticity benchmark). The maths is in `patching.inspect.neurons`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from patching.errors import PatchingError
from patching.inspect.latents import (
    ActivatingContext,
    InspectConfig,
    TokenEffect,
    activating_context,
    direction_effect,
    histogram,
)
from patching.inspect.neurons import (
    Decomposition,
    Neuron,
    TopKTracker,
    Unit,
    check_sae_site,
    check_units,
    cluster_concentration,
    decompose,
    group_by_dominant,
    output_direction,
    readout,
    token_concentration,
)
from patching.model import tl_compat
from patching.model.sites import Site
from patching.splice.collect import Corpus, iter_site_values
from patching.splice.splicer import SpliceChecks
from patching.configs import resolve_config
from sae.deprecation import positional_config, renamed_fields, renamed_keywords


@renamed_fields(n_top="k")  # the old name works for one release, with a DeprecationWarning
@dataclass(frozen=True)
class NeuronConfig:
    """How much `inspect_units` reports."""

    inspect: InspectConfig = InspectConfig()
    """Contexts shown (`k_contexts`), their window, histogram bins, logit-effect tokens, batching."""
    k: int = 32
    """Top contexts grouped by dominant latent and scored (at least `inspect.k_contexts`)."""
    k_latents: int = 5
    """Latents listed per context."""
    k_variance: int = 10
    """Latents listed by share of the unit's variance."""

    def __post_init__(self) -> None:
        for name in ("k", "k_latents", "k_variance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PatchingError(f"NeuronConfig.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.inspect, InspectConfig):
            raise PatchingError(f"NeuronConfig.inspect must be an InspectConfig, got {type(self.inspect).__name__}")
        if self.k < self.inspect.k_contexts:
            raise PatchingError(f"NeuronConfig.k ({self.k}) must be >= inspect.k_contexts "
                                f"({self.inspect.k_contexts}): shown contexts are a prefix of the scored ones")


class ContextTerms(NamedTuple):
    """One top context's decomposition."""

    latents: list[tuple[int, float]]
    """The latents contributing most, `(latent, contribution)`, largest first."""
    b_dec: float
    """Decoder-bias term."""
    error: float
    """SAE-error term."""
    constant: float
    """The unit's bias."""
    total: float
    """The pre-activation; equals the sum of every latent's contribution and the three terms."""
    dominant: int
    """The latent with the largest contribution."""


@dataclass
class UnitReport:
    """Everything `inspect_units` found about one neuron or direction."""

    unit: Unit
    """The unit."""
    sae_site: Site
    """Where the SAE (and the unit's input) is."""
    top_tokens: list[TokenEffect]
    """Largest direct logit effects of what the unit writes (a neuron's W_out row)."""
    bottom_tokens: list[TokenEffect]
    """Most negative direct logit effects."""
    contexts: list[ActivatingContext]
    """Top-activating contexts, strongest first (the first `k_contexts` of the scored ones)."""
    terms: list[ContextTerms]
    """Decomposition at each of the `k` scored contexts."""
    counts: Tensor
    """Histogram counts of the unit's activation over the corpus."""
    edges: Tensor
    """Histogram bin edges."""
    n_tokens: int
    """Corpus positions counted."""
    n_active: int
    """Positions with a positive activation."""
    variance: list[tuple[int, float]]
    """Latents with the largest share `Cov(term, pre) / Var(pre)` of the pre-activation's variance."""
    variance_terms: dict[str, float] = field(default_factory=dict)
    """Shares of the `b_dec` and `error` terms and of all latents together (with the latents' shares they sum to 1)."""
    groups: list[tuple[int, list[int]]] = field(default_factory=list)
    """Scored contexts grouped by dominant latent: `(latent, [context indices])`, largest first."""
    token_score: float | None = None
    """`token_concentration` of the scored contexts' tokens."""
    cluster_score: float | None = None
    """`cluster_concentration` of their dominant latents."""

    @property
    def label(self) -> str:
        return self.unit.label

    @property
    def frequency(self) -> float:
        return self.n_active / max(self.n_tokens, 1)

    def to_text(self) -> str:
        lines = [f"{self.label}: positive on {self.n_active}/{self.n_tokens} tokens ({100 * self.frequency:.2f}%); "
                 f"token score {_fmt(self.token_score)}, cluster score {_fmt(self.cluster_score)}"]
        lines.append("  variance shares: " + ", ".join(f"#{i} {share:.3f}" for i, share in self.variance)
                     + "; " + ", ".join(f"{k} {v:.3f}" for k, v in self.variance_terms.items()))
        lines.append("  top contexts (dominant latent):")
        for context, terms in zip(self.contexts, self.terms):
            lines.append(f"    {context.activation:8.3f}  #{terms.dominant:<6} {context.text!r}")
        lines.append("  groups: " + ", ".join(f"#{latent} x{len(members)}" for latent, members in self.groups))
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


class _Moments:
    """Running sums for `Cov(term, pre)`: n, Σpre, Σpre², Σterm, Σterm·pre per unit."""

    def __init__(self, n_units: int, d_sae: int) -> None:
        self.n = 0
        self.pre, self.pre2 = torch.zeros(n_units, dtype=torch.float64), torch.zeros(n_units, dtype=torch.float64)
        self.term = torch.zeros(n_units, d_sae + 2, dtype=torch.float64)  # latents, b_dec, error
        self.cross = torch.zeros(n_units, d_sae + 2, dtype=torch.float64)

    def add(self, j: int, parts: Decomposition) -> None:
        terms = torch.cat([parts.latents, parts.b_dec[:, None], parts.error[:, None]], -1).double()  # (tokens, d_sae + 2)
        y = parts.total.double()
        self.pre[j] += y.sum()
        self.pre2[j] += y.pow(2).sum()
        self.term[j] += terms.sum(0)
        self.cross[j] += y @ terms

    def shares(self, j: int) -> Tensor:
        mean_y = self.pre[j] / self.n
        var = self.pre2[j] / self.n - mean_y ** 2
        cov = self.cross[j] / self.n - self.term[j] / self.n * mean_y
        return (cov / var).float() if var > 0 else torch.zeros_like(cov).float()


@renamed_keywords(n_top="k")
@positional_config
def inspect_units(model: Any, sae: Any, units: Sequence[Unit], corpus: Corpus, *, config: NeuronConfig | None = None,
                  site: Site | None = None, checks: SpliceChecks | None = None, **overrides: Any) -> list[UnitReport]:
    """Reports for neurons / directions from one pass over the corpus (validated before any forward).

    `config` (a `NeuronConfig`) with `overrides` replacing single fields."""
    config = resolve_config(NeuronConfig, config, overrides)
    units = check_units(model, units)
    reads = [readout(model, unit) for unit in units]
    sae_site, sae = check_sae_site(model, sae, site, reads, checks=checks)
    act_sites = [unit.site for unit in units]
    sites = sorted(set(act_sites) | {sae_site})
    n = len(units)

    def values(acts: dict[str, Tensor]) -> Tensor:
        columns = [_unit_activation(acts[s.hook_name], unit) for s, unit in zip(act_sites, units)]
        return torch.cat([torch.stack(columns, -1).float(), acts[sae_site.hook_name].float()], -1)

    tracker = TopKTracker(config.k, n)
    payload = torch.zeros(0, n, tl_compat.d_model(model))
    moments, rows, all_values = _Moments(n, sae.d_sae), [], []
    cfg = config.inspect
    for item in iter_site_values(model, sites, corpus, values, batch_rows=cfg.batch_size, exclude_special=cfg.exclude_special):
        acts, x = item.latents[:, :n], item.latents[:, n:]
        rows.append(item.tokens)
        kept_x = x[item.keep]
        moments.n += kept_x.shape[0]
        with torch.inference_mode():
            for j, read in enumerate(reads):
                moments.add(j, decompose(sae, read, kept_x))
        all_values.append(acts[item.keep])
        entered = tracker.update(item.row, item.tokens, acts, item.keep)
        payload = _merge_payload(payload, entered, x, tracker.k)
    top = tracker.result()
    values_all = torch.cat(all_values) if all_values else torch.zeros(0, n)
    return [_report(model, sae, sae_site, unit, reads[j], j, top, payload[:, j], rows, values_all[:, j], moments, config)
            for j, unit in enumerate(units)]


def _unit_activation(act: Tensor, unit: Unit) -> Tensor:
    if isinstance(unit, Neuron):
        return act[..., unit.index]
    return act.float() @ unit.vector.to(act.device).float()


def _merge_payload(payload: Tensor, entered: Tensor, x: Tensor, k: int) -> Tensor:
    """Keep each unit's residual vectors at its current top-k positions, in tracker order."""
    # `entered[r, j]` is a position of this row, or -1 for an entry carried over; carried entries
    # keep their relative order, so they are the old payload's first rows in sequence.
    out = torch.zeros(entered.shape[0], entered.shape[1], x.shape[-1])
    for j in range(entered.shape[1]):
        new = entered[:, j]
        carried = payload[: int((new < 0).sum()), j]
        out[new < 0, j] = carried
        out[new >= 0, j] = x[new[new >= 0]]
    return out


def _report(model: Any, sae: Any, sae_site: Site, unit: Unit, read: Any, j: int, top: Any, x_top: Tensor,
            rows: list[Tensor], values: Tensor, moments: _Moments, config: NeuronConfig) -> UnitReport:
    found = torch.isfinite(top.values[:, j])
    positive = found & (top.values[:, j] > 0)
    with torch.inference_mode():
        parts = decompose(sae, read, x_top[found])
    terms = [_context_terms(parts, i, config.k_latents) for i in range(int(found.sum()))]
    contexts = [activating_context(model, rows[int(top.rows[i, j])], int(top.positions[i, j]), float(top.values[i, j]),
                                   int(top.rows[i, j]), config.inspect) for i in range(int(found.sum()))]
    shares = moments.shares(j)
    latent_shares = shares[:-2]
    order = torch.argsort(latent_shares, descending=True)[: config.k_variance].tolist()
    top_tokens, bottom_tokens = direction_effect(model, output_direction(model, unit), config.inspect.k_tokens)
    counts, edges = histogram(values, config.inspect.bins)
    dominant = [t.dominant for t, ok in zip(terms, positive[found].tolist()) if ok]
    return UnitReport(
        unit=unit, sae_site=sae_site, top_tokens=top_tokens, bottom_tokens=bottom_tokens,
        contexts=contexts[: config.inspect.k_contexts], terms=terms, counts=counts, edges=edges,
        n_tokens=int(values.numel()), n_active=int((values > 0).sum()),
        variance=[(i, float(latent_shares[i])) for i in order],
        variance_terms={"all latents": float(latent_shares.sum()), "b_dec": float(shares[-2]), "error": float(shares[-1])},
        groups=group_by_dominant(dominant), cluster_score=cluster_concentration(dominant) if dominant else None,
        token_score=token_concentration([int(t) for t in top.tokens[:, j][positive].tolist()]),
    )


def _context_terms(parts: Decomposition, i: int, k: int) -> ContextTerms:
    latents = parts.latents[i]
    best = torch.topk(latents, min(k, latents.shape[0]))
    return ContextTerms([(int(a), float(v)) for v, a in zip(best.values, best.indices)], float(parts.b_dec[i]),
                        float(parts.error[i]), parts.constant, float(parts.total[i]), int(best.indices[0]))


class UnitScores(NamedTuple):
    """Monosemanticity of every neuron of a layer and every latent of an SAE, one formula for both."""

    neurons: Tensor
    """`(d_mlp,)` token concentration of each neuron's top `k` contexts; NaN with fewer positive ones."""
    latents: Tensor
    """`(d_sae,)` the same for each latent."""
    neuron_max: Tensor
    """`(d_mlp,)` each neuron's largest activation."""
    latent_max: Tensor
    """`(d_sae,)` each latent's largest activation."""
    n_tokens: int
    """Corpus positions counted."""


@renamed_keywords(n_top="k", batch_rows="batch_size")
def unit_scores(model: Any, sae: Any, layer: int, corpus: Corpus, *, k: int = 20, hook: str = "mlp_post",
                site: Site | None = None, batch_size: int = 8, checks: SpliceChecks | None = None) -> UnitScores:
    """Score every `hook` neuron of `layer` and every latent of `sae` in one pass, from each unit's
    top `k` contexts; `batch_size` corpus rows per forward (`n_top=`, `batch_rows=`: deprecated names)."""
    from patching.splice.collect import resolve_site

    sae_site, sae = resolve_site(model, sae, site, checks=checks)
    neuron_site = Site(layer, hook).check(model)  # type: ignore[arg-type]
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise PatchingError(f"k must be an int >= 2, got {k!r}")
    d_mlp = neuron_site.width(model)

    def values(acts: dict[str, Tensor]) -> Tensor:
        return torch.cat([acts[neuron_site.hook_name].float(), sae.encode(acts[sae_site.hook_name]).float()], -1)

    tracker, n_tokens = TopKTracker(k, d_mlp + sae.d_sae), 0
    for item in iter_site_values(model, sorted({neuron_site, sae_site}), corpus, values, batch_rows=batch_size):
        tracker.update(item.row, item.tokens, item.latents, item.keep)
        n_tokens += int(item.keep.sum())
    top = tracker.result()
    scores = torch.full((d_mlp + sae.d_sae,), float("nan"))
    for j in range(d_mlp + sae.d_sae):
        positive = top.values[:, j] > 0
        if int(positive.sum()) == k:
            scores[j] = token_concentration(top.tokens[:, j].tolist())
    best = top.values[0] if top.values.shape[0] else torch.full((d_mlp + sae.d_sae,), float("nan"))
    return UnitScores(scores[:d_mlp], scores[d_mlp:], best[:d_mlp], best[d_mlp:], n_tokens)
