"""The sweep engine: exact activation patching, many patches per forward pass.

For each prompt pair it runs the base and source prompts once (caching latents, errors and the
residual stream), keeps only units whose elements differ between the runs, and evaluates the
rest in chunks along the batch dimension: every row of a chunk starts at the unit's first layer
from the cached base residual stream, carries its own patch, and is read out only at the
metric's position. A unit none of whose elements differ in a pair has the base run's metric
exactly, without a forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
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
from patching.sweep.objectives import KLFromClean, Metric
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


def readout_logits(model: Any, final_resid: Tensor, readout: int | None) -> Tensor:
    """Logits at one position `(rows, vocab)` or every position `(rows, pos, vocab)`."""
    if readout is None:
        return tl_compat.readout(model, final_resid)
    return tl_compat.readout(model, final_resid[:, readout])


def reference_run(model: Any, state: Splice | None, tokens: Tensor, layers: Sequence[int], readout: int | None,
                  raw_sites: Sequence[Site] = ()) -> RunCache:
    """Run `tokens` once; keep the readout logits, SAE records, resid_pre at `layers` and `raw_sites`."""
    names = list(dict.fromkeys([Site(layer).hook_name for layer in layers] + [site.hook_name for site in raw_sites]))
    if state is not None:
        state.cache = True
    try:
        final, acts = tl_compat.run_until_end_with_cache(model, tokens, names)
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
    )


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


@contextlib.contextmanager
def raw_patch_hooks(model: Any, patches: list[tuple[Tensor, Site, Tensor, Tensor, Tensor]]) -> Iterator[None]:
    """Write raw activations element-wise, `x[rows, positions, dims] = values`, for one forward."""
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
    with tl_compat.hooks(model, [(site.hook_name, make_hook(site, items)) for site, items in by_site.items()]):
        yield


def evaluate_units(model: Any, state: Splice | None, units: list[PatchUnit], pair_index: int, pair: PromptPair,
                   base: RunCache, source: RunCache, metric: Metric, positions: tuple[int, ...] | None,
                   rows_per_chunk: int, progress: tqdm | None) -> tuple[Tensor, Tensor]:
    """Metric values of every unit for one pair, and a mask of which needed a forward pass.

    Rows are grouped by first layer, so that a trace (one unit per layer and position) runs full
    batches (`_chunks`). A chunk reuses the base prompt's keys and values before its earliest
    patched position (causally untouched in every row of it) and runs only the suffix from there
    (when the metric reads one position). Rows whose own first patch comes later recompute a few
    unpatched positions: that costs less than running them as batches of one.
    """
    values = torch.empty(len(units))
    evaluated = torch.zeros(len(units), dtype=torch.bool)
    base_metric = metric(base.logits[None], torch.tensor([pair_index]))[0]
    readout = metric.readout
    last_read = None if readout is None else readout % pair.n_base
    pending: dict[int, list[tuple[int, int, list]]] = {}
    for i, unit in enumerate(units):
        elements = element_patches(unit, pair, base, source, positions)
        first = min(int(e[2].min()) for e in elements) if elements else None
        if first is None or (last_read is not None and first > last_read):
            values[i] = base_metric  # nothing differs, or only after the position the metric reads
        else:
            pending.setdefault(unit.start_layer, []).append((first if readout is not None else 0, i, elements))
    if progress is not None:
        progress.update(len(units) - sum(len(items) for items in pending.values()))
    prefixes: dict[int, Any] = {}
    for start, items in sorted(pending.items()):
        for chunk in _chunks(items, rows_per_chunk):
            first = chunk[0][0]
            if first > 0 and first not in prefixes:
                prefixes[first] = tl_compat.prefix_cache(model, pair.base[:, :first])
            rows = [(i, elements) for _, i, elements in chunk]
            logits = _run_chunk(model, state, rows, base, start, first, prefixes.get(first), readout)
            chunk_values = metric(logits, torch.full((len(rows),), pair_index)).cpu()
            check_metric_finite(chunk_values, [units[i].label() for i, _ in rows], pair_index)
            values[[i for i, _ in rows]] = chunk_values
            evaluated[[i for i, _ in rows]] = True
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


def _chunks(items: list[tuple[int, int, list]], rows_per_chunk: int) -> list[list[tuple[int, int, list]]]:
    """Chunks of one start layer's rows `(first patched position, unit, elements)`, earliest first.

    Rows sharing a first position fill chunks of their own (their suffix starts where they do);
    what is left of each position, fewer rows than a chunk, is pooled across positions, so that a
    trace with one row per (layer, position) still runs full batches."""
    by_first: dict[int, list[tuple[int, int, list]]] = {}
    for item in items:
        by_first.setdefault(item[0], []).append(item)
    chunks, rest = [], []
    for first in sorted(by_first):
        group = by_first[first]
        full = len(group) - len(group) % rows_per_chunk
        chunks += [group[lo : lo + rows_per_chunk] for lo in range(0, full, rows_per_chunk)]
        rest += group[full:]
    chunks += [rest[lo : lo + rows_per_chunk] for lo in range(0, len(rest), rows_per_chunk)]
    return sorted(chunks, key=lambda chunk: chunk[0][0])


def _run_chunk(model: Any, state: Splice | None, chunk: list[tuple[int, list]], base: RunCache, start: int, first: int,
               prefix: Any, readout: int | None) -> Tensor:
    latent_patches, error_patches, raw_patches = [], [], []
    for row, (_, elements) in enumerate(chunk):
        for kind, site, pos, lat, vals in elements:
            rows, pos = torch.full_like(pos, row), pos - first  # positions within the suffix
            if kind == "latent":
                latent_patches.append((site, rows, pos, lat, vals))
            elif kind == "error":
                error_patches.append((site, rows, pos, vals))
            else:
                raw_patches.append((rows, site, pos, lat, vals))
    edits = [LatentPatch(site, torch.cat([p[1] for p in group]), torch.cat([p[2] for p in group]),
                         torch.cat([p[3] for p in group]), torch.cat([p[4] for p in group]))
             for site, group in _group(latent_patches).items()]
    edits += [ErrorPatch(site, torch.cat([p[1] for p in group]), torch.cat([p[2] for p in group]),
                         torch.cat([p[3] for p in group]))
              for site, group in _group(error_patches).items()]
    if edits and state is None:
        raise PatchingError("latent or error patches need SAEs spliced")
    if state is not None:
        state.set_edits(edits)
    residual = base.resid[start][first:][None].expand(len(chunk), -1, -1)
    cache = tl_compat.expand_cache(prefix, len(chunk)) if prefix is not None else None
    try:
        with raw_patch_hooks(model, raw_patches):
            final = tl_compat.run_blocks(model, residual, start, cache)
    finally:
        if state is not None:
            state.set_edits(())
    suffix_readout = None if readout is None else readout if readout < 0 else readout - first
    return readout_logits(model, final, suffix_readout)


def _group(items: list[tuple]) -> dict[Site, list[tuple]]:
    grouped: dict[Site, list[tuple]] = {}
    for item in items:
        grouped.setdefault(item[0], []).append(item)
    return grouped


def bind_metric(metric: Metric, clean_runs: list[RunCache]) -> Metric:
    """Metrics that compare against the clean run (KL) get each pair's clean logits."""
    if isinstance(metric, KLFromClean):
        return metric.bind(torch.stack([run.logits for run in clean_runs]))
    return metric


def reference_metrics(metric: Metric, runs: list[tuple[RunCache, RunCache]], direction: str) -> tuple[Metric, Tensor, Tensor]:
    """The metric bound to the clean runs, M_clean and M_corrupted per pair; refuses pairs it cannot tell apart."""
    clean_runs = [source if direction == "denoise" else base for base, source in runs]
    metric = bind_metric(metric, clean_runs)
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
