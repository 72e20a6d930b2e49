"""Exact path patching, many paths per forward pass.

Path patching (Wang et al. 2022, "Interpretability in the Wild", §3.1; Goldowsky-Dill et al. 2023,
"Localizing Model Behavior with Path Patching") measures a sender's effect carried only by its
direct edges into chosen receivers: (1) run the base and source prompts; (2) run the base with the
sender's output taken from the source and every other node frozen at its base value, recording the
receivers' inputs; (3) run the base with only the receivers' inputs set to those values, everything
downstream recomputed, and read the metric.

Step 2 needs no forward pass: with every other node frozen, the stream a receiver reads is the base
run's plus the sender's output change (the stream is a sum of node outputs, `nodes.py`), and the
receiver's own norm and projection turn it into its input. Step 3 sets that stream on the receiver's
input hook alone (`tl_paths.node_inputs`: one copy of the stream per head), so TransformerLens
computes the receiver exactly as in a frozen run. Each (sender, receiver group) is one batch row;
a row joins the batch at its first receiver's block from the cached base stream
(`run_blocks_joining`), and a row whose receivers are only the logits needs no block at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from patching.configs import resolve_config
from patching.errors import PatchingError
from patching.model import tl_compat, tl_paths
from patching.model.sites import Site
from patching.paths.latent_paths import encode_sites, latent_delta, latent_receiver_hooks
from patching.paths.latents import check_latent_sites
from patching.paths.nodes import LatentNode, Node, Receiver, check_graph, reaches
from patching.paths.results import PathResult
from patching.splice.splicer import SpliceChecks
from patching.paths.stream import StreamRun, node_delta, read_stream, stream_run
from patching.sweep.engine import DEFAULT_MEMORY_MB, RunCache, check_metric_finite, normalized_effect, readout_logits, reference_metrics
from patching.sweep.objectives import Metric, as_metric
from patching.sweep.pairs import Direction, Prompts, make_pairs
from patching.sweep.patch import check_run_settings, provenance_record, run_lengths


@dataclass(frozen=True)
class PathConfig:
    """Settings of `patch_paths`."""

    direction: Direction = "denoise"
    """`denoise`: senders take their clean outputs in the corrupted run; `noise`: the reverse."""
    by: Literal["sender", "edge"] = "sender"
    """`sender`: one value per sender, through every receiver at once (Wang et al.'s receiver set);
    `edge`: one value per (sender, receiver)."""
    batch_size: int | None = None
    """Rows per forward pass; None sizes waves to `memory_mb`."""
    memory_mb: int = DEFAULT_MEMORY_MB
    """Rough activation budget of one wave when `batch_size` is None."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.direction not in ("denoise", "noise"):
            raise PatchingError(f"PathConfig.direction must be 'denoise' or 'noise', got {self.direction!r}")
        if self.by not in ("sender", "edge"):
            raise PatchingError(f"PathConfig.by must be 'sender' or 'edge', got {self.by!r}")


Row = tuple[int, int, int, list[Any]]
"""A patched row: (start layer, sender index, group index, the group's receivers the sender reaches)."""


def patch_paths(model: Any, clean: Prompts, corrupted: Prompts, metric: Any, *,
                senders: Sequence[Node | LatentNode] | None = None, receivers: Sequence[Receiver | LatentNode] | None = None,
                edges: Sequence[tuple[Any, Any]] | None = None, saes: Any = None, checks: SpliceChecks | None = None,
                config: PathConfig | None = None, **overrides: Any) -> PathResult:
    """Each sender's effect through its direct edges into `receivers` (see the module docstring).

    Prompts of a pair must have equal token lengths. `result.metric[p, s, g]` is the metric of
    sender s's paths through receiver group g (all receivers with `by="sender"`, receiver g with
    `by="edge"`); a sender that reaches none of a group's receivers, or whose output does not change,
    has the base run's metric exactly, without a forward pass. Instead of `senders` × `receivers`,
    `edges` names single (sender, receiver) edges (`by="edge"`): only those run, every other cell
    of the grid is NaN.

    With `saes` (SAEs on residual-stream sites, as `splice` takes them; `checks` waives mismatches)
    `LatentNode`s are senders and receivers too: SAE latents and error nodes (`latent_paths.py`)."""
    config = resolve_config(PathConfig, config, overrides)
    metric = as_metric(metric)
    pairs = make_pairs(model, clean, corrupted, direction=config.direction, align=None)
    check_run_settings(model, metric, len(pairs), config.batch_size, config.memory_mb, lengths=run_lengths(pairs))
    resolved = {} if saes is None else check_latent_sites(model, saes, checks)
    senders, receivers, wanted = _graph_or_edges(model, senders, receivers, edges, config, resolved)
    check_latent_positions([*senders, *receivers], min(pair.n_base for pair in pairs))
    groups = [tuple(receivers)] if config.by == "sender" else [(receiver,) for receiver in receivers]
    with torch.inference_mode():
        sites = [site.hook_name for site in resolved]
        runs = [(stream_run(model, p.base, metric.readout, keys_values=True, extra=sites),
                 stream_run(model, p.source, metric.readout, extra=sites)) for p in pairs]
        metric, m_clean, m_corrupted = reference_metrics(metric, [(RunCache(b.logits), RunCache(s.logits)) for b, s in runs],
                                                         config.direction)
        values = torch.empty(len(pairs), len(senders), len(groups))
        evaluated = 0
        n_pos = max(pair.n_base for pair in pairs)
        rows_per_wave = wave_rows(model, n_pos, metric.readout, config)
        with tqdm(total=len(pairs) * len(senders) * len(groups), desc="path patching", disable=not config.progress,
                  leave=False) as bar, tl_paths.node_inputs(model):
            for i, (base, source) in enumerate(runs):
                values[i], n_rows = pair_values(model, metric, i, (base, source), senders, groups, rows_per_wave, bar,
                                                wanted, resolved)
                evaluated += n_rows
        if wanted is not None:
            values[:, ~wanted] = float("nan")
    effect = normalized_effect(values.flatten(1), m_clean, m_corrupted, config.direction).view_as(values)
    extra = {"by": config.by, "senders": [s.label() for s in senders], "n_receivers": len(receivers)}
    if resolved:
        extra["checks"] = (checks or SpliceChecks()).to_dict()
    return PathResult(senders=senders, receivers=groups, effect=effect, metric=values, metric_clean=m_clean,
                      metric_corrupted=m_corrupted, direction=config.direction, method="exact",
                      base_tokens=[tl_compat.to_str_tokens(model, pair.base[0]) for pair in pairs],
                      provenance=provenance_record(model, pairs, metric, config.direction, extra, evaluated,
                                                   saes=resolved or None))


def _graph_or_edges(model: Any, senders: Any, receivers: Any, edges: Any, config: PathConfig,
                    saes: dict[Site, Any]) -> tuple[list[Any], list[Any], Tensor | None]:
    """Checked senders and receivers, and with `edges` the (senders, receivers) mask of wanted cells."""
    saes_or_none = saes or None
    if edges is None:
        return (*check_graph(model, senders, receivers, saes_or_none), None)
    if senders is not None or receivers is not None:
        raise PatchingError("give either senders= and receivers=, or edges=, not both")
    if config.by != "edge":
        raise PatchingError("edges= patches single edges: it needs by='edge'")
    if isinstance(edges, (str, tuple)) or not isinstance(edges, Sequence) or not edges or not all(
            isinstance(e, tuple) and len(e) == 2 for e in edges):
        raise PatchingError(f"edges must be a non-empty list of (Node, Receiver) pairs, got {edges!r}")
    senders, receivers = check_graph(model, list(dict.fromkeys(u for u, _ in edges)), list(dict.fromkeys(r for _, r in edges)),
                                     saes_or_none)
    wanted = torch.zeros(len(senders), len(receivers), dtype=torch.bool)
    for u, r in edges:
        wanted[senders.index(u), receivers.index(r)] = True
    return senders, receivers, wanted


def check_latent_positions(nodes: Sequence[Any], n_pos: int) -> None:
    """Refuse a latent or error node whose position lies past the shortest prompt."""
    for node in nodes:
        if isinstance(node, LatentNode) and node.pos is not None and node.pos >= n_pos:
            raise PatchingError(f"{node.label()}: position out of range for prompts of {n_pos} tokens")


def wave_rows(model: Any, n_pos: int, readout: int | None, config: PathConfig) -> int:
    """Rows per forward pass: `batch_size`, or what fits `memory_mb` with one copy of the stream per
    query and key/value head in each block (the split inputs)."""
    if config.batch_size is not None:
        return config.batch_size
    d_model, d_mlp = tl_compat.d_model(model), tl_compat.d_mlp(model) or 0
    heads = tl_compat.n_heads(model) + 2 * tl_compat.n_kv_heads(model)
    per_row = n_pos * (d_model * (heads + 10) + 3 * d_mlp + 2 * tl_compat.n_heads(model) * n_pos)
    per_row += tl_compat.d_vocab(model) * (n_pos if readout is None else 1)
    return max(1, int(config.memory_mb * 2**20 / (4 * per_row)))


def pair_values(model: Any, metric: Metric, pair_index: int, runs: tuple[StreamRun, StreamRun], senders: list[Any],
                groups: list[tuple[Any, ...]], rows_per_wave: int, bar: tqdm, wanted: Tensor | None = None,
                saes: dict[Site, Any] | None = None) -> tuple[Tensor, int]:
    """(senders, groups) metric values for one pair (its base and source runs), and how many rows ran
    through blocks or readout (only the `wanted` cells when a mask is given)."""
    base, source = runs
    saes = saes or {}
    codes = (encode_sites(saes, base), encode_sites(saes, source)) if saes else None
    base_metric = metric(base.logits[None], torch.tensor([pair_index]))[0]
    values = torch.full((len(senders), len(groups)), float(base_metric))
    n_layers = tl_compat.n_layers(model)
    deltas, firsts, rows = {}, {}, []
    n_pos = base.final.shape[0]
    last_read = n_pos - 1 if metric.readout is None else metric.readout % n_pos
    for s, node in enumerate(senders):
        delta = latent_delta(saes, *codes, node) if isinstance(node, LatentNode) else node_delta(model, base, source, node)
        changed = torch.nonzero(delta.any(-1)).flatten()
        if not changed.numel() or int(changed[0]) > last_read:
            continue  # the sender's output is the same in both runs where the metric can see it
        deltas[s], firsts[s] = delta, 0 if metric.readout is None else int(changed[0])
        for g, group in enumerate(groups):
            if wanted is not None and not wanted[s, g]:
                continue
            reached = [r for r in group if reaches(node, r, model)]
            if reached:
                start = min([r.layer for r in reached if r.kind != "logits"], default=n_layers)
                rows.append((start, s, g, reached))
    rows.sort(key=lambda row: row[0])
    bar.update(values.numel() - len(rows))
    for lo in range(0, len(rows), rows_per_wave):
        wave = rows[lo: lo + rows_per_wave]
        first = min(firsts[s] for _, s, _, _ in wave)
        logits = run_wave(model, base, wave, torch.stack([deltas[s] for _, s, _, _ in wave]), metric, first, saes)
        wave_values = metric(logits, torch.full((len(wave),), pair_index)).cpu()
        check_metric_finite(wave_values, [f"{senders[s].label()} -> group {g}" for _, s, g, _ in wave], pair_index)
        values[[s for _, s, _, _ in wave], [g for _, _, g, _ in wave]] = wave_values
        bar.update(len(wave))
    return values, len(rows)


def run_wave(model: Any, base: StreamRun, wave: list[Row], deltas: Tensor, metric: Metric, first: int,
             saes: dict[Site, Any] | None = None) -> Tensor:
    """Readout logits of the wave's rows (sorted by start layer); `deltas` (rows, pos, d_model) are
    the senders' output changes, zero before position `first`. Rows run only the positions from
    `first` on, after the base run's keys and values: before it every row's stream is the base's."""
    n_layers, n_pos = tl_compat.n_layers(model), base.final.shape[0]
    starts = [start for start, _, _, _ in wave]
    in_blocks = sum(start < n_layers for start in starts)
    deltas = deltas[:, first:]
    finals = []
    if in_blocks:
        joins = [(layer, base.acts[Site(layer, "resid_pre").hook_name][first:][None].expand(starts.count(layer), -1, -1))
                 for layer in sorted(set(starts)) if layer < n_layers]
        prefix = tl_compat.cache_before(base.keys_values, n_pos, first)
        hooks = receiver_hooks(model, base, wave[:in_blocks], deltas[:in_blocks], first)
        hooks += latent_receiver_hooks(saes or {}, base, [reached for _, _, _, reached in wave[:in_blocks]],
                                       deltas[:in_blocks], first)
        with tl_compat.hooks(model, hooks):
            finals.append(tl_compat.run_blocks_joining(model, joins, prefix))
    if in_blocks < len(wave):
        finals.append(base.final[first:][None].expand(len(wave) - in_blocks, -1, -1))
    final = torch.cat(finals)
    to_logits = torch.tensor([any(r.kind == "logits" for r in reached) for _, _, _, reached in wave])
    final = final + to_logits[:, None, None].to(final.dtype) * deltas  # the sender's direct path to the logits
    if metric.readout is None:  # then first is 0
        return readout_logits(model, final, None)
    readout = metric.readout % n_pos - first
    return tl_compat.readout(model, final[:, readout], getattr(metric, "columns", lambda: None)())


def receiver_hooks(model: Any, base: StreamRun, rows: list[Row], deltas: Tensor, first: int) -> list[tuple[str, Any]]:
    """Hooks that give each row's receivers the stream they read in the frozen run: base + delta
    (both from position `first` on)."""
    n_heads = {"q": tl_compat.n_heads(model), "k": tl_compat.n_kv_heads(model), "v": tl_compat.n_kv_heads(model)}
    masks: dict[tuple[int, str], Tensor] = {}
    reads: dict[tuple[int, str], Receiver] = {}
    for row, (_, _, _, reached) in enumerate(rows):
        for r in reached:
            if r.kind == "logits" or isinstance(r, LatentNode):
                continue
            key = (r.layer, r.kind)
            if key not in masks:
                masks[key] = torch.zeros(len(rows), n_heads.get(r.kind, 1), dtype=torch.bool)
                reads[key] = r
            masks[key][row, 0 if r.head is None else r.head] = True
    return [(tl_paths.input_hook_name(layer, kind), _setter(mask, read_stream(model, base, reads[(layer, kind)])[first:], deltas,
                                                            per_head=kind != "mlp"))
            for (layer, kind), mask in masks.items()]


def _setter(mask: Tensor, stream: Tensor, deltas: Tensor, *, per_head: bool) -> Any:
    """A hook writing `stream + deltas[row]` where `mask[row, head]`; rows beyond those joined so far
    (`run_blocks_joining` appends rows) have no receiver at this block."""

    def hook(x: Tensor) -> Tensor:
        n = x.shape[0]
        value = stream[None] + deltas[:n]  # (n, pos, d_model)
        if per_head:  # x: (n, pos, heads, d_model)
            return torch.where(mask[:n, None, :, None], value[:, :, None, :].to(x.dtype), x)
        return torch.where(mask[:n, 0, None, None], value.to(x.dtype), x)

    return hook
