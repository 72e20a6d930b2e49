"""The sweep engine: exact activation patching, many patches per forward pass.

For each prompt pair it runs the base and source prompts once (caching latents, errors and the
residual stream), keeps only units whose elements differ between the runs, and evaluates the
rest in batches of rows that first patch the same position: every row joins its batch at the
unit's first layer from the cached base residual stream, runs only the positions from the
patched one on (after the base run's keys and values), carries its own patch, and is read out
only at the metric's position. A unit none of whose elements differ in a pair has the base run's metric
exactly, without a forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from patching.errors import PatchingError
from patching.model import tl_compat
from patching.model.sites import Site
from patching.splice.edits import ErrorPatch, LatentPatch
from patching.splice.splicer import Splice
from patching.sweep.objectives import Metric, ReferenceRuns, bind_metric
from patching.sweep.pairs import PromptPair
from patching.sweep.units import PatchUnit, position_mask

DEFAULT_MEMORY_MB = 1024


@dataclass
class RunCache:
    """One reference run of one prompt (batch dimension dropped)."""

    logits: Tensor
    """Logits at the metric's readout position, (vocab,), or every position, (pos, vocab)."""
    latents: dict[Site, Tensor] = field(default_factory=dict)
    """SAE latents per site, (pos, d_sae)."""
    errors: dict[Site, Tensor] = field(default_factory=dict)
    """SAE errors per site, (pos, d_in)."""
    resid: dict[int, Tensor] = field(default_factory=dict)
    """resid_pre per layer where patched rows may start, (pos, d_model)."""
    raw: dict[Site, Tensor] = field(default_factory=dict)
    """Raw activations at sites with raw units, (pos, width)."""
    keys_values: Any = None
    """The run's frozen key-value cache when kept (base runs): a patched row's keys and values
    before its first patched position are a slice of it."""


def readout_logits(model: Any, final_resid: Tensor, readout: int | None) -> Tensor:
    """Logits at one position `(rows, vocab)` or every position `(rows, pos, vocab)`."""
    if readout is None:
        return tl_compat.readout(model, final_resid)
    return tl_compat.readout(model, final_resid[:, readout])


def reference_run(model: Any, state: Splice | None, tokens: Tensor, layers: Sequence[int], readout: int | None,
                  raw_sites: Sequence[Site] = (), keys_values: bool = False) -> RunCache:
    """Run `tokens` (one row) once; keep the readout logits, SAE records, resid_pre at `layers` and
    `raw_sites` (and the keys and values, with `keys_values`)."""
    names = list(dict.fromkeys([Site(layer).hook_name for layer in layers] + [site.hook_name for site in raw_sites]))
    if state is not None:
        state.cache = True
    try:
        if keys_values:
            final, acts, kv = tl_compat.run_until_end_with_keys_values(model, tokens, names)
        else:
            (final, acts), kv = tl_compat.run_until_end_with_cache(model, tokens, names), None
    finally:
        if state is not None:
            state.cache = False
    records = state.records if state is not None else {}
    return RunCache(
        logits=readout_logits(model, final, readout)[0],
        latents={site: r.latents[0] for site, r in records.items()},
        errors={site: r.error[0] for site, r in records.items()},
        resid={layer: acts[Site(layer).hook_name][0] for layer in layers},
        raw={site: site.select(acts[site.hook_name])[0] for site in raw_sites},
        keys_values=kv,
    )


def reference_runs(model: Any, state: Splice | None, pair: PromptPair, layers: Sequence[int], readout: int | None,
                   raw_sites: Sequence[Site] = ()) -> tuple[RunCache, RunCache]:
    """A pair's base and source runs, the base keeping its keys and values (patched rows' prefixes
    are slices of them). Two forwards, not one of both rows: a two-row batch rounds a row's
    positions differently from a one-row run (measured), and the sweep must see positions whose
    tokens agree as equal, to skip them."""
    return (reference_run(model, state, pair.base, layers, readout, raw_sites, keys_values=True),
            reference_run(model, state, pair.source, layers, readout, raw_sites))


def element_patches(unit: PatchUnit, pair: PromptPair, base: RunCache, source: RunCache,
                    positions: tuple[int, ...] | None) -> list[tuple[str, Site, Tensor, Tensor, Tensor]]:
    """The elements of `unit` that differ in this pair, as (kind, site, positions, indices, values).

    Indices are latents for `latent` parts and dimensions for `raw` parts (unused for `error`)."""
    out = []
    mapped = pair.mapped
    for part in unit.parts:
        allowed = mapped & position_mask(mapped.shape[0], part.positions if part.positions is not None else positions)
        pos = torch.nonzero(allowed).flatten()
        src = pair.source_position[pos]
        if part.kind == "latent":
            lat = torch.arange(base.latents[part.site].shape[1]) if part.latents is None else torch.tensor(part.latents)
            z_src, z_base = source.latents[part.site][src][:, lat], base.latents[part.site][pos][:, lat]
            p_idx, l_idx = torch.nonzero(z_src != z_base, as_tuple=True)
            if p_idx.numel():
                out.append(("latent", part.site, pos[p_idx], lat[l_idx], z_src[p_idx, l_idx]))
        elif part.kind == "error":
            if pos.numel():
                out.append(("error", part.site, pos, pos, source.errors[part.site][src]))
        else:
            if part.site.kind == "pattern" and pair.n_base != pair.source.shape[1]:
                raise PatchingError(f"{unit.label()}: a pattern's key positions are only comparable between prompts of "
                                    f"equal length ({pair.n_base} vs {pair.source.shape[1]} tokens)")
            width = base.raw[part.site].shape[1]
            dims = torch.arange(width) if part.latents is None else torch.tensor(part.latents)
            x_src, x_base = source.raw[part.site][src][:, dims], base.raw[part.site][pos][:, dims]
            p_idx, d_idx = torch.nonzero(x_src != x_base, as_tuple=True)
            if p_idx.numel():
                out.append(("raw", part.site, pos[p_idx], dims[d_idx], x_src[p_idx, d_idx]))
    return out


def chunk_rows(n_units: int, n_pos: int, model: Any, saes: Mapping[Site, Any], readout: int | None,
               batch_size: int | None, memory_mb: int) -> int:
    """Rows per forward pass: `batch_size` if given, else what fits a rough memory budget."""
    if batch_size is not None:
        return batch_size
    d_model, d_mlp = tl_compat.d_model(model), tl_compat.d_mlp(model) or 0
    per_row = n_pos * (8 * d_model + 3 * d_mlp + 2 * tl_compat.n_heads(model) * n_pos + 3 * sum(s.d_sae for s in saes.values()))
    per_row += tl_compat.d_vocab(model) * (n_pos if readout is None else 1) * 2
    return max(1, min(n_units, int(memory_mb * 2**20 / (4 * per_row))))


def raw_patch_hooks(patches: list[tuple[Tensor, Site, Tensor, Tensor, Tensor]]) -> list[tuple[str, Any]]:
    """Hooks that write raw activations element-wise, `x[rows, positions, dims] = values`."""
    by_site: dict[Site, list[tuple[Tensor, Tensor, Tensor, Tensor]]] = {}
    for rows, site, pos, dims, values in patches:
        by_site.setdefault(site, []).append((rows, pos, dims, values))

    def make_hook(site: Site, items: list[tuple[Tensor, Tensor, Tensor, Tensor]]):
        rows, pos, dims, values = (torch.cat([item[k] for item in items]) for k in range(4))

        def hook(x: Tensor) -> Tensor:
            x = x.clone(memory_format=torch.contiguous_format)  # so that `select` is a view even for every head
            site.select(x)[rows, pos, dims] = values.to(x.dtype)
            return x

        return hook

    # several heads of one hook chain their hooks
    return [(site.hook_name, make_hook(site, items)) for site, items in by_site.items()]


def evaluate_units(model: Any, state: Splice | None, units: list[PatchUnit], pair_index: int, pair: PromptPair,
                   base: RunCache, source: RunCache, metric: Metric, positions: tuple[int, ...] | None,
                   rows_per_chunk: int, progress: tqdm | None) -> tuple[Tensor, Tensor]:
    """Metric values of every unit for one pair, and a mask of which needed a forward pass.

    Rows are grouped by the first position they patch, across start layers: a group reuses the
    base prompt's keys and values before that position (causally untouched in every row of it)
    and runs only the suffix from there (when the metric reads one position), and each row joins
    the group's batch at its own first layer (`tl_compat.run_blocks_joining`). A trace (one unit
    per layer and position) thus runs one batch per position, each row paying only for its own
    layers and positions. Waves of at most `rows_per_chunk` rows bound the memory, and each wave
    unembeds its rows at once. `base` must keep its keys and values (`reference_runs`): every
    group's prefix is a slice of them.
    """
    values = torch.empty(len(units))
    evaluated = torch.zeros(len(units), dtype=torch.bool)
    base_metric = metric(base.logits[None], torch.tensor([pair_index]))[0]
    readout = metric.readout
    last_read = None if readout is None else readout % pair.n_base
    pending: list[tuple[int, int, int, list]] = []
    suffixes = readout is not None and not tl_compat.full_rows(model)
    for i, unit in enumerate(units):
        elements = element_patches(unit, pair, base, source, positions)
        first = min(int(e[2].min()) for e in elements) if elements else None
        if first is None or (last_read is not None and first > last_read):
            values[i] = base_metric  # nothing differs, or only after the position the metric reads
        else:
            pending.append((first if suffixes else 0, unit.start_layer, i, elements))
    if progress is not None:
        progress.update(len(units) - len(pending))
    columns = getattr(metric, "columns", lambda: None)()
    for wave in _waves(pending, rows_per_chunk):
        logits = _run_wave(model, state, wave, pair, base, readout, columns)
        rows = [i for group in wave for _, _, i, _ in group]
        chunk_values = metric(logits, torch.full((len(rows),), pair_index)).cpu()
        check_metric_finite(chunk_values, [units[i].label() for i in rows], pair_index)
        values[rows] = chunk_values
        evaluated[rows] = True
        if progress is not None:
            progress.update(len(rows))
    return values, evaluated


def check_metric_finite(values: Tensor, labels: Sequence[str], pair_index: int) -> None:
    """Refuse a metric value that is NaN or infinite, naming the unit: normalising it would hand
    back NaN effects that look like results."""
    bad = torch.nonzero(~torch.isfinite(values)).flatten().tolist()
    if bad:
        raise PatchingError(f"the metric returned {values[bad[0]].item()} (expected a finite number) for unit "
                            f"{labels[bad[0]]} in pair {pair_index}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""))


Row = tuple[int, int, int, list]
"""A patched row: (first patched position, start layer, unit index, elements)."""


def _waves(items: list[Row], rows_per_chunk: int) -> list[list[list[Row]]]:
    """Waves of at most `rows_per_chunk` rows, each a list of groups of rows sharing a first
    position, in start-layer order (the order rows join their group's batch)."""
    ordered = sorted(items, key=lambda item: (item[0], item[1]))
    waves = []
    for lo in range(0, len(ordered), rows_per_chunk):
        groups: dict[int, list[Row]] = {}
        for item in ordered[lo : lo + rows_per_chunk]:
            groups.setdefault(item[0], []).append(item)
        waves.append(list(groups.values()))
    return waves


def _run_wave(model: Any, state: Splice | None, wave: list[list[Row]], pair: PromptPair, base: RunCache,
              readout: int | None, columns: Tensor | None) -> Tensor:
    """Readout logits of every row of a wave, group after group, each group's patches in place
    while it runs (interleaving the groups layer by layer, to reuse each block's weights while
    cached, measured no faster)."""
    finals = []
    for group in wave:
        edits, hooks, joins, prefix = _group_plan(group, base, pair.n_base)
        if edits and state is None:
            raise PatchingError("latent or error patches need SAEs spliced")
        if state is not None:
            state.set_edits(edits)
        try:
            with tl_compat.hooks(model, hooks):
                final = tl_compat.run_blocks_joining(model, joins, prefix)
        finally:
            if state is not None:
                state.set_edits(())
        if readout is None:  # every row starts at position 0: one group
            return readout_logits(model, final, None)
        finals.append(final[:, readout if readout < 0 else readout - group[0][0]])
    # one unembedding for the wave, of only the logits the metric reads when it says which
    return tl_compat.readout(model, torch.cat(finals), columns)


def _group_plan(group: list[Row], base: RunCache, n_base: int) -> tuple[list, list[tuple[str, Any]], list, Any]:
    """A group's SAE edits, raw-patch hooks, joins and key-value prefix; rows are indexed
    in the group's own batch and positions within its suffix."""
    first = group[0][0]
    latent_patches, error_patches, raw_patches = [], [], []
    for row, (_, _, _, elements) in enumerate(group):
        for kind, site, pos, lat, vals in elements:
            rows, pos = torch.full_like(pos, row), pos - first  # positions within the suffix
            if kind == "latent":
                latent_patches.append((site, rows, pos, lat, vals))
            elif kind == "error":
                error_patches.append((site, rows, pos, vals))
            else:
                raw_patches.append((rows, site, pos, lat, vals))
    edits: list = [LatentPatch(site, torch.cat([p[1] for p in items]), torch.cat([p[2] for p in items]),
                               torch.cat([p[3] for p in items]), torch.cat([p[4] for p in items]))
                   for site, items in _group(latent_patches).items()]
    edits += [ErrorPatch(site, torch.cat([p[1] for p in items]), torch.cat([p[2] for p in items]),
                         torch.cat([p[3] for p in items]))
              for site, items in _group(error_patches).items()]
    starts = [start for _, start, _, _ in group]
    joins = [(start, base.resid[start][first:][None].expand(starts.count(start), -1, -1)) for start in sorted(set(starts))]
    prefix = tl_compat.cache_before(base.keys_values, n_base, first)  # after any bound context the cache holds
    return edits, raw_patch_hooks(raw_patches), joins, prefix


def _group(items: list[tuple]) -> dict[Site, list[tuple]]:
    grouped: dict[Site, list[tuple]] = {}
    for item in items:
        grouped.setdefault(item[0], []).append(item)
    return grouped


def reference_metrics(metric: Metric, runs: list[tuple[RunCache, RunCache]], direction: str) -> tuple[Metric, Tensor, Tensor]:
    """The metric bound to the clean runs, M_clean and M_corrupted per pair; refuses pairs it cannot tell apart."""
    clean_runs, corrupted_runs = zip(*[(source, base) if direction == "denoise" else (base, source) for base, source in runs])
    metric = bind_metric(metric, ReferenceRuns(torch.stack([run.logits for run in clean_runs]),
                                               torch.stack([run.logits for run in corrupted_runs])))
    m_base = torch.stack([metric(base.logits[None], torch.tensor([i]))[0] for i, (base, _) in enumerate(runs)]).cpu()
    m_source = torch.stack([metric(src.logits[None], torch.tensor([i]))[0] for i, (_, src) in enumerate(runs)]).cpu()
    for name, values in (("base", m_base), ("source", m_source)):
        for i in torch.nonzero(~torch.isfinite(values)).flatten().tolist()[:1]:
            raise PatchingError(f"the metric returned {values[i].item()} (expected a finite number) on the unpatched "
                                f"{name} run of pair {i}")
    m_clean, m_corrupted = (m_source, m_base) if direction == "denoise" else (m_base, m_source)
    same = torch.nonzero(m_clean == m_corrupted).flatten().tolist()
    if same:
        raise PatchingError(f"the metric gives the same value on the clean and corrupted prompts of pair(s) {same}: "
                            "effects cannot be normalised; choose a metric that tells them apart")
    return metric, m_clean, m_corrupted


def normalized_effect(values: Tensor, m_clean: Tensor, m_corrupted: Tensor, direction: str) -> Tensor:
    """DESIGN.md: denoise (M_p - M_corr) / (M_clean - M_corr); noise (M_clean - M_p) / (same)."""
    span = (m_clean - m_corrupted)[:, None]
    return (values - m_corrupted[:, None]) / span if direction == "denoise" else (m_clean[:, None] - values) / span
