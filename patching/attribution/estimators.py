"""Attribution patching over SAE latents and error nodes: linear estimates of patching effects.

- `atp` (Nanda 2022; Syed et al. 2023; Marks et al. 2024, "Sparse Feature Circuits", eq. 2):
  effect(n) ≈ (n_source − n_base) · ∂M/∂n at the base run; one gradient for every latent and
  error node at every site (gradients to the upstream sites flow through the downstream ones).
- `ig` (Sundararajan et al. 2017, as used by Marks et al. 2024, eq. 3): the gradient averaged at
  `steps` midpoints of the straight path from the base to the source values, one site at a time
  with the other sites free; the `steps` points run as one batch.
- `atp_gd` (Kramár et al. 2024, "AtP*", section 3.2, GradDrop): for each block ℓ downstream of
  the first site, the AtP estimate with the gradient through block ℓ's residual writes dropped;
  the score is the mean of their absolute values. It is unsigned: a ranking against
  cancellation between paths, not an effect size.

Every SAE architecture is attributed the same way: dM/dz is read at the splice's probes on the
latents, and the encoder's output cancels out of the gradient, so a TopK selection or a JumpReLU
step is never differentiated; it enters only through the two runs' exact latent values
(tests/test_architectures.py checks AtP against exact patching on TopK and JumpReLU SAEs).

Estimates come back as a `PatchResult` (method ≠ "exact") whose `metric` column is
M_base + estimate. Model parameters do not take gradients during the call (their
`requires_grad` flags are restored afterwards), so a backward pass costs about one forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from patching.errors import PatchingError
from patching.model import tl_compat
from patching.model.sites import Site
from patching.splice.edits import ErrorPatch, LatentEdit
from patching.splice.splicer import Splice, SpliceChecks, resolve_saes, splice
from patching.sweep.engine import RunCache, normalized_effect, readout_logits, reference_metrics, reference_run
from patching.sweep.objectives import Metric, as_metric
from patching.sweep.pairs import Align, PromptPair, Prompts, check_positions, make_pairs
from patching.sweep.patch import check_run_settings, differs_mask, flag_small_spans, provenance_record, run_lengths
from patching.sweep.results import PatchResult
from patching.sweep.units import PatchUnit, differing_units

Method = Literal["atp", "ig", "atp_gd"]
METHODS: tuple[str, ...] = ("atp", "ig", "atp_gd")
MAX_IG_STEPS = 1024
"""Most integrated-gradients path points: each holds the activations once more (1e8 asked the allocator
for 10 TB); the CLI's `--steps` takes the same bound (`latentpatch.cli.common.MAX_IG_STEPS`)."""


def attribute_latents(model: Any, saes: Any, clean: Prompts, corrupted: Prompts, metric: Any, *,
                      method: Method = "atp", steps: int = 8, direction: str = "denoise",
                      positions: Sequence[int] | None = None, align: Align = None, include_error: bool = True,
                      progress: bool = True, checks: SpliceChecks | None = None) -> PatchResult:
    """Estimate every latent's (and error node's) patching effect; see the module docstring."""
    if method not in METHODS:
        raise PatchingError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_IG_STEPS:
        raise PatchingError(f"steps must be a positive int at most {MAX_IG_STEPS}, got {steps!r}")
    metric = as_metric(metric)
    if metric.readout is None:
        raise PatchingError("attribution needs a metric that reads one position (e.g. LogitDiff(position=-1))")
    pairs = make_pairs(model, clean, corrupted, direction=direction, align=align)
    positions = check_positions(pairs, positions)
    check_run_settings(model, metric, len(pairs), lengths=run_lengths(pairs))
    resolved = resolve_saes(model, saes, checks=checks)
    layers = sorted({site.layer for site in resolved})
    with frozen_parameters(model), splice(model, resolved, checks=checks) as state:
        with torch.no_grad():
            runs = [(reference_run(model, state, p.base, layers, metric.readout),
                     reference_run(model, state, p.source, layers, metric.readout)) for p in pairs]
        metric, m_clean, m_corrupted = reference_metrics(metric, runs, direction)
        units = _units(differs_mask(pairs, runs, resolved), positions, include_error)
        estimates = torch.zeros(len(pairs), len(units))
        for i, (pair, (base, source)) in enumerate(tqdm(list(zip(pairs, runs)), desc=f"attribution ({method})",
                                                        disable=not progress, leave=False)):
            scores = _estimate(model, state, method, steps, i, pair, base, source, metric, layers[0])
            estimates[i] = _gather(units, scores)
    m_base = m_corrupted if direction == "denoise" else m_clean
    values = m_base[:, None] + estimates
    effect = normalized_effect(values, m_clean, m_corrupted, direction)
    if method == "atp_gd":  # unsigned scores: keep them non-negative after normalisation
        effect, values = effect.abs(), m_base[:, None] + estimates
    extra = {"unit": "latent_position+error" if include_error else "latent_position", "method": method,
             "steps": steps if method == "ig" else None,
             "checks": (checks or SpliceChecks()).to_dict()}
    result = PatchResult(units=units, effect=effect, metric=values, metric_clean=m_clean, metric_corrupted=m_corrupted,
                         direction=direction, method=method,
                         base_tokens=[tl_compat.to_str_tokens(model, pair.base[0]) for pair in pairs],
                         provenance=provenance_record(model, pairs, metric, direction, extra, 0, saes=resolved),
                         context={"model": model, "saes": resolved, "clean": clean, "corrupted": corrupted,
                                  "metric": metric, "direction": direction, "align": align, "checks": checks})
    flag_small_spans(result)
    return result


@contextlib.contextmanager
def frozen_parameters(model: Any) -> Iterator[None]:
    """Parameters do not require grad inside the block; their flags are restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _units(differs: dict[Site, Tensor], positions: tuple[int, ...] | None, include_error: bool) -> list[PatchUnit]:
    """The exact sweep's units: each differing (position, latent) and, with `include_error`, each
    position's error node, over the positions every pair has."""
    units = differing_units("latent_position", differs, positions, None)
    return units + (differing_units("error", differs, positions, None) if include_error else [])


def _gather(units: list[PatchUnit], scores: dict[Site, tuple[Tensor, Tensor]]) -> Tensor:
    """Pick each unit's score from the per-site (pos, d_sae) latent and (pos,) error score maps.
    Units lie within every pair (`differs_mask` spans the shortest base prompt), so every score
    exists: a position beyond a pair is an error, never a silent zero."""
    out = torch.zeros(len(units))
    for j, unit in enumerate(units):
        part = unit.parts[0]
        latent_scores, error_scores = scores[part.site]
        p = part.positions[0]
        if p >= latent_scores.shape[0]:
            raise PatchingError(f"unit {unit.label()} lies beyond a pair of {latent_scores.shape[0]} positions")
        out[j] = latent_scores[p, part.latents[0]] if part.kind == "latent" else error_scores[p]
    return out


def _deltas(pair: PromptPair, base: RunCache, source: RunCache, site: Site) -> tuple[Tensor, Tensor]:
    """Source minus base latents and errors at aligned positions; zero where nothing is aligned."""
    return (pair.source_minus_base(source.latents[site], base.latents[site]),
            pair.source_minus_base(source.errors[site], base.errors[site]))


def _estimate(model: Any, state: Splice, method: str, steps: int, pair_index: int, pair: PromptPair,
              base: RunCache, source: RunCache, metric: Metric, start: int) -> dict[Site, tuple[Tensor, Tensor]]:
    deltas = {site: _deltas(pair, base, source, site) for site in state.saes}
    if method == "atp":
        grads = _gradients(model, state, base, metric, pair_index, start, rows=1, edits=())
        return {site: _score(deltas[site], grads[site]) for site in state.saes}
    if method == "ig":
        return {site: _score(deltas[site], path_gradients(model, state, base, metric, pair_index, site, deltas[site], steps))
                for site in state.saes}
    drops = range(start, tl_compat.n_layers(model))
    total = {site: (torch.zeros_like(d[0]), torch.zeros(d[1].shape[0])) for site, d in deltas.items()}
    for layer in drops:
        with drop_block_gradient(model, layer):
            grads = _gradients(model, state, base, metric, pair_index, start, rows=1, edits=())
        for site in state.saes:
            latent_scores, error_scores = _score(deltas[site], grads[site])
            total[site] = (total[site][0] + latent_scores.abs(), total[site][1] + error_scores.abs())
    return {site: (lat / len(drops), err / len(drops)) for site, (lat, err) in total.items()}


def _score(delta: tuple[Tensor, Tensor], grad: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    (dz, de), (gz, ge) = delta, grad
    return dz * gz, (de * ge).sum(-1)


def _gradients(model: Any, state: Splice, base: RunCache, metric: Metric, pair_index: int, start: int, rows: int,
               edits: Sequence[Any]) -> dict[Site, tuple[Tensor, Tensor]]:
    """Mean over `rows` of dM/dz and dM/de at every site, from the base run's residual at `start`."""
    state.track_grads, state.cache = True, False
    state.set_edits(edits)
    try:
        with torch.enable_grad():
            residual = base.resid[start].clone()[None].expand(rows, -1, -1)
            final = tl_compat.run_blocks(model, residual, start)
            values = metric(readout_logits(model, final, metric.readout), torch.full((rows,), pair_index))
            values.sum().backward()
        return {site: (record.latents_grad.mean(0), record.error_grad.mean(0))
                for site, record in state.records.items()}
    finally:
        state.track_grads = False
        state.set_edits(())
        state.records.clear()


def path_gradients(model: Any, state: Splice, base: RunCache, metric: Metric, pair_index: int, site: Site,
                    delta: tuple[Tensor, Tensor], steps: int) -> tuple[Tensor, Tensor]:
    """IG: gradients at the midpoints alpha = (k + 1/2) / steps of base + alpha * delta at `site`."""
    dz, de = delta
    alphas = (torch.arange(steps, dtype=dz.dtype) + 0.5) / steps
    z_path = base.latents[site][None] + alphas[:, None, None] * dz[None]
    e_path = base.errors[site][None] + alphas[:, None, None] * de[None]
    n_pos = dz.shape[0]
    rows = torch.arange(steps).repeat_interleave(n_pos)
    positions = torch.arange(n_pos).repeat(steps)
    edits = [LatentEdit(site, None, z_path, mode="set"),
             ErrorPatch(site, rows, positions, e_path.reshape(steps * n_pos, -1))]
    return _gradients(model, state, base, metric, pair_index, site.layer, rows=steps, edits=edits)[site]


@contextlib.contextmanager
def drop_block_gradient(model: Any, layer: int) -> Iterator[None]:
    """GradDrop: block `layer`'s attention and MLP writes keep their values but pass no gradient."""
    # Prepended so that a splice at the same hook still builds its gradient probes on top.
    names = [Site(layer, kind).hook_name for kind in ("attn_out", "mlp_out")]
    present = [(name, lambda x: x.detach()) for name in names if name in tl_compat.hook_names(model)]
    with tl_compat.hooks(model, present, prepend=True):
        yield
