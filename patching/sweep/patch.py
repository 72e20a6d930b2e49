"""`patch_latents` and `patch_residual`: exact activation-patching sweeps, one call each.

Semantics (DESIGN.md, Patching): denoise runs the corrupted prompt and sets the chosen units to
their clean values, effect = (M_patched − M_corr) / (M_clean − M_corr); noise runs the clean
prompt and sets them to their corrupted values, effect = (M_clean − M_patched) / (M_clean − M_corr).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from patching.errors import PatchingError
from patching.model import tl_compat
from patching.model.provenance import provenance
from patching.model.sites import Site
from patching.splice.splicer import Splice, SpliceChecks, resolve_saes, splice
from patching.sweep.engine import (
    DEFAULT_MEMORY_MB,
    RunCache,
    chunk_rows,
    evaluate_units,
    normalized_effect,
    reference_metrics,
    reference_runs,
)
from patching.sweep.objectives import as_metric, describe
from patching.sweep.pairs import Align, Direction, PromptPair, Prompts, check_positions, make_pairs
from patching.sweep.results import METRIC_TOLERANCE, PatchResult
from patching.sweep.units import (LatentSet, PatchUnit, UnitKind, UnitPart, check_unit_kind, differing_units, head_units,
                                  joint_units)
from sae.deprecation import renamed_keywords

log = logging.getLogger(__name__)


@renamed_keywords(unit="units")
def patch_latents(model: Any, saes: Any, clean: Prompts, corrupted: Prompts, metric: Any, *,
                  direction: Direction = "denoise", units: UnitKind | Sequence[PatchUnit] = "latent_position",
                  positions: Sequence[int] | None = None, align: Align = None,
                  latent_sets: Sequence[LatentSet] | None = None, batch_size: int | None = None,
                  memory_mb: int = DEFAULT_MEMORY_MB, progress: bool = True,
                  checks: SpliceChecks | None = None) -> PatchResult:
    """Patch SAE latents (or error nodes) between clean and corrupted runs; one unit per column.

    `units`: a kind, `latent_position` (each differing latent at each position), `latent` (a latent
    at all positions), `position` (all latents at one position), `error` (the error node at each
    position), `joint` (each of `latent_sets` at once) or any kind added with `register_unit_kind`;
    or an explicit list of `PatchUnit`s.
    (`unit=`, the old name of the kind, still works with a `DeprecationWarning`.)
    `positions` restricts the base-run positions considered. Results are indexed by site when
    SAEs sit at several sites.
    """
    unit, units = (check_unit_kind(units), None) if isinstance(units, str) else ("latent_position", units)
    metric = as_metric(metric)
    pairs = make_pairs(model, clean, corrupted, direction=direction, align=align)
    positions = check_positions(pairs, positions)
    check_run_settings(model, metric, len(pairs), batch_size, memory_mb, lengths=run_lengths(pairs))
    resolved = resolve_saes(model, saes, checks=checks)
    if unit == "joint":
        joint_units(latent_sets, {site: sae.d_sae for site, sae in resolved.items()}, positions)  # refuse bad sets now
    if units is not None:
        _check_units(units, resolved, min(pair.n_base for pair in pairs))
    layers = sorted({site.layer for site in resolved})
    with torch.inference_mode(), splice(model, resolved, checks=checks) as state:
        runs = [reference_runs(model, state, p, layers, metric.readout) for p in pairs]
        if units is None:
            units = differing_units(unit, differs_mask(pairs, runs, resolved), positions, latent_sets)
        units = list(units)
        return _sweep(model, state, pairs, runs, units, metric, direction, positions, batch_size, memory_mb, progress,
                      provenance={"unit": unit, "checks": (checks or SpliceChecks()).to_dict()})


def patch_residual(model: Any, clean: Prompts, corrupted: Prompts, metric: Any, *, direction: Direction = "denoise",
                   layers: Sequence[int] | None = None, positions: Sequence[int] | None = None, align: Align = None,
                   units: Sequence[PatchUnit] | None = None, batch_size: int | None = None,
                   memory_mb: int = DEFAULT_MEMORY_MB, progress: bool = True) -> PatchResult:
    """Raw activation patching. By default one unit per (layer, position) at `resid_pre`: the
    causal-tracing picture. Explicit `units` of kind `raw` patch any site, any set of dimensions
    or MLP neurons (`UnitPart(Site(6, "mlp_post"), "raw", None, (12, 40))`), jointly."""
    metric = as_metric(metric)
    pairs = make_pairs(model, clean, corrupted, direction=direction, align=align)
    positions = check_positions(pairs, positions)
    check_run_settings(model, metric, len(pairs), batch_size, memory_mb, lengths=run_lengths(pairs))
    shortest = min(pair.n_base for pair in pairs)
    if units is None:
        layers = list(range(tl_compat.n_layers(model))) if layers is None else [Site(layer).check(model).layer for layer in layers]
        units = [PatchUnit((UnitPart(Site(layer), "raw", (p,)),)) for layer in layers
                 for p in (positions if positions is not None else range(shortest))]
    else:
        _check_raw_units(model, units, shortest)
    raw_sites = sorted({part.site for unit in units for part in unit.parts})
    start_layers = sorted({site.layer for site in raw_sites})
    with torch.inference_mode():
        runs = [reference_runs(model, None, p, start_layers, metric.readout, raw_sites) for p in pairs]
        return _sweep(model, None, pairs, runs, list(units), metric, direction, positions, batch_size, memory_mb,
                      progress, provenance={"unit": "raw"})


def patch_heads(model: Any, clean: Prompts, corrupted: Prompts, metric: Any, *, kind: str = "z",
                by: Literal["all", "position"] = "all", direction: Direction = "denoise", layers: Sequence[int] | None = None,
                positions: Sequence[int] | None = None, align: Align = None, batch_size: int | None = None,
                memory_mb: int = DEFAULT_MEMORY_MB, progress: bool = True) -> PatchResult:
    """Patch every attention head of `kind` (`z`, `q`, `k`, `v`, `pattern`, `head_out`), at every
    position (`by="all"`) or one position at a time (`by="position"`): TransformerLens's
    `get_act_patch_attn_head_{out,q,k,v,pattern}_{all_pos,by_pos}` through the batched engine.

    Units run in (layer, head) or (layer, position, head) order, so `result.metric[0]` reshapes to
    TransformerLens's result. `k` and `v` have one unit per key/value head (grouped-query attention)."""
    pairs = make_pairs(model, clean, corrupted, direction=direction, align=align)
    positions = check_positions(pairs, positions)
    layers = list(range(tl_compat.n_layers(model))) if layers is None else [Site(layer).check(model).layer for layer in layers]
    shortest = min(pair.n_base for pair in pairs)
    units = head_units(model, kind, layers, by, positions if positions is not None else range(shortest))
    return patch_residual(model, clean, corrupted, metric, direction=direction, positions=positions, align=align,
                          units=units, batch_size=batch_size, memory_mb=memory_mb, progress=progress)


def _check_raw_units(model: Any, units: Sequence[PatchUnit], n_pos: int) -> None:
    for unit in units:
        if not isinstance(unit, PatchUnit):
            raise PatchingError(f"units must be PatchUnit values, got {type(unit).__name__}")
        for part in unit.parts:
            if part.kind != "raw":
                raise PatchingError(f"patch_residual takes raw units; {unit.label()} is {part.kind!r} (use patch_latents)")
            width = part.site.check(model).width(model)
            if part.latents is not None and (min(part.latents) < 0 or max(part.latents) >= width):
                raise PatchingError(f"unit {unit.label()}: dimensions must lie in [0, {width})")
            if part.positions is not None and (min(part.positions) < 0 or max(part.positions) >= n_pos):
                raise PatchingError(f"unit {unit.label()}: positions must lie in [0, {n_pos}) (the shortest base prompt)")


def _check_units(units: Sequence[PatchUnit], saes: dict[Site, Any], n_pos: int) -> None:
    for unit in units:
        if not isinstance(unit, PatchUnit):
            raise PatchingError(f"units must be PatchUnit values, got {type(unit).__name__}")
        for part in unit.parts:
            if part.kind == "raw":
                raise PatchingError("raw units belong to patch_residual, not patch_latents")
            if part.site not in saes:
                raise PatchingError(f"unit {unit.label()} names {part.site}, but SAEs are at {[str(s) for s in saes]}")
            if part.latents is not None and (min(part.latents) < 0 or max(part.latents) >= saes[part.site].d_sae):
                raise PatchingError(f"unit {unit.label()}: latents must lie in [0, {saes[part.site].d_sae})")
            if part.positions is not None and (min(part.positions) < 0 or max(part.positions) >= n_pos):
                raise PatchingError(f"unit {unit.label()}: positions must lie in [0, {n_pos}) (the shortest base prompt)")


def check_run_settings(model: Any, metric: Any, n_pairs: int, batch_size: int | None = None,
                       memory_mb: int | None = None, *, lengths: Sequence[int] = ()) -> None:
    """Refuse bad batch settings, metric token ids and (given the token `lengths` of every run) a
    metric position outside the shortest run, before any forward pass (None: not used by the caller)."""
    readout = getattr(metric, "readout", None)
    if lengths and readout is not None:
        shortest = min(lengths)
        if isinstance(readout, bool) or not isinstance(readout, int) or not -shortest <= readout < shortest:
            raise PatchingError(f"metric {describe(metric)} reads position {readout!r}, outside the shortest prompt "
                                f"({shortest} tokens): give a position in [-{shortest}, {shortest})")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0):
        raise PatchingError(f"batch_size must be a positive int or None, got {batch_size!r}")
    if memory_mb is not None and (isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb <= 0):
        raise PatchingError(f"memory_mb must be a positive int, got {memory_mb!r}")
    vocab = tl_compat.d_vocab(model)
    for tokens in getattr(metric, "token_ids", lambda: [])():
        if tokens.numel() not in (1, n_pairs):
            raise PatchingError(f"metric {describe(metric)} gives {tokens.numel()} token ids for {n_pairs} pairs; give 1 or {n_pairs}")
        if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
            raise PatchingError(f"metric {describe(metric)} names token ids outside [0, {vocab})")


def run_lengths(pairs: Sequence[PromptPair]) -> list[int]:
    """Token lengths of every run of `pairs` (base and source): where a metric's position must lie."""
    return [n for pair in pairs for n in (pair.n_base, pair.source.shape[1])]


def differs_mask(pairs: list[PromptPair], runs: list[tuple[RunCache, RunCache]], saes: dict[Site, Any]) -> dict[Site, Tensor]:
    """Per site, (pos, d_sae): whether the latent differs between aligned runs in any pair.

    Positions run over the shortest base prompt: a unit must exist in every pair it is averaged
    over (explicit `positions` and `units` are held to the same range)."""
    n_pos = min(pair.n_base for pair in pairs)
    out = {site: torch.zeros(n_pos, sae.d_sae, dtype=torch.bool) for site, sae in saes.items()}
    for pair, (base, source) in zip(pairs, runs):
        for site in saes:
            out[site] |= (pair.source_minus_base(source.latents[site], base.latents[site]) != 0)[:n_pos].cpu()
    return out


def _sweep(model: Any, state: Splice | None, pairs: list[PromptPair], runs: list[tuple[RunCache, RunCache]],
           units: list[PatchUnit], metric: Any, direction: str, positions: tuple[int, ...] | None,
           batch_size: int | None, memory_mb: int, progress: bool, provenance: dict[str, Any]) -> PatchResult:
    metric, m_clean, m_corrupted = reference_metrics(metric, runs, direction)
    n_pos = max(pair.n_base for pair in pairs)
    rows = chunk_rows(len(units), n_pos, model, state.saes if state else {}, metric.readout, batch_size, memory_mb)
    values = torch.empty(len(pairs), len(units))
    evaluated = torch.zeros(len(pairs), len(units), dtype=torch.bool)
    with tqdm(total=len(units) * len(pairs), desc="patching", unit="patch", disable=not progress, leave=False) as bar:
        for i, (pair, (base, source)) in enumerate(zip(pairs, runs)):
            values[i], evaluated[i] = evaluate_units(model, state, units, i, pair, base, source, metric, positions, rows, bar)
    result = PatchResult(
        units=units, effect=normalized_effect(values, m_clean, m_corrupted, direction), metric=values,
        metric_clean=m_clean, metric_corrupted=m_corrupted, direction=direction, method="exact",
        base_tokens=[tl_compat.to_str_tokens(model, pair.base[0]) for pair in pairs],
        provenance=provenance_record(model, pairs, metric, direction, provenance, int(evaluated.sum()),
                                     saes=state.saes if state else None),
    )
    flag_small_spans(result)
    return result


def flag_small_spans(result: PatchResult) -> None:
    """Record (in the provenance, saved with the result) and log the pairs whose span is too small
    for reproducible normalised effects; the effects are kept, flagged, not refused."""
    small = result.small_span_pairs
    result.provenance["small_span_pairs"] = small
    if small:
        spans = (result.metric_clean - result.metric_corrupted)[small].tolist()
        log.warning("pairs %s have clean-corrupted spans %s: their effects may move by up to %.2g with batch size "
                    "(tolerance %.0e / |span|)", small, [f"{v:.3g}" for v in spans],
                    float(result.effect_tolerance[small].max()), METRIC_TOLERANCE)


def provenance_record(model: Any, pairs: list[PromptPair], metric: Any, direction: str, extra: dict[str, Any],
                      n_forward_rows: int, *, saes: Any = None) -> dict[str, Any]:
    """The one provenance record (`patching.model.provenance`) of a sweep or an estimate: the pairs'
    base and source prompts as text, the rows the engine ran, and `extra` (unit kind, checks, ...)."""
    prompts = {"base": [tl_compat.to_string(model, pair.base[0]) for pair in pairs],
               "source": [tl_compat.to_string(model, pair.source[0]) for pair in pairs]}
    return provenance(model, saes=saes, prompts=prompts, metric=describe(metric), direction=direction,
                      patched_rows_evaluated=n_forward_rows, **extra)
