"""Circuits over the head/MLP graph: edge-ablated runs, faithfulness and completeness, `find_circuit`.

A circuit is a set of edges (node → receiver, `nodes.py`). Running the clean prompt with only the
circuit intact means every edge outside it carries its sender's ablated output instead: a receiver
reads the live stream minus, for each missing edge, the sender's live output plus its ablated one.
The ablation is stated with every result: `resample` (the sender's output in the pair's corrupted
run, the default), `zero`, `mean` (its mean over every clean prompt and position) or
`position_mean` (its mean over the clean prompts at each position; prompts of one length). Senders' live outputs are themselves computed from ablated inputs, so the circuit computes
recursively, as in ACDC (Conmy et al. 2023) and Marks et al. 2024. With every edge missing the run is
the corrupted run; with none missing it is the clean run.

Faithfulness (Marks et al. 2024, "Sparse Feature Circuits", §3.3; DESIGN.md "Paths and edges"):
`(M(C) − M(∅)) / (M(full) − M(∅))`, where M(full) is the clean run and M(∅) the run with every edge
of the graph missing (the corrupted run when the graph is the whole model; a graph over some layers
leaves the rest intact, so M(∅) is measured, not assumed); completeness is the same score for the
complement (every edge of the graph not in C): near 0 when the circuit holds everything that matters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from patching.configs import resolve_config
from patching.errors import PatchingError
from patching.figures import subplots
from patching.model import tl_compat, tl_paths
from patching.model.sites import Site
from patching.paths.edges import attribute_edges
from patching.paths.graph import circuit_document, plot_graph_document, write_graph_json
from patching.paths.nodes import Node, Receiver, check_graph, reaches, receivers_of, upstream_nodes
from patching.paths.mixed_circuits import MixedCircuitResult, find_mixed_circuit
from patching.paths.path_patching import patch_paths
from patching.paths.qk_edges import atp_star_edges
from patching.paths.results import ABLATIONS, CircuitCurve, Faithfulness, plot_circuit_curve
from patching.saved import SavedResult
from patching.splice.splicer import SpliceChecks
from patching.paths.stream import StreamRun, ablated_outputs, stream_run
from patching.sweep.engine import RunCache, readout_logits, reference_metrics
from patching.sweep.objectives import Metric, as_metric
from patching.sweep.pairs import Prompts, make_pairs
from patching.sweep.patch import check_run_settings, provenance_record, run_lengths

Edge = tuple[Node, Receiver]




def edge_ablated_metrics(model: Any, clean: Prompts, corrupted: Prompts, metric: Any, circuits: Sequence[set[Edge]], *,
                         senders: Sequence[Node], receivers: Sequence[Receiver],
                         ablation: str = "resample") -> tuple[Tensor, Tensor, Tensor]:
    """M of the clean prompt with only each circuit's edges intact, (pairs, circuits); and M_clean,
    M_corrupted (pairs,). The graph is every existing edge from `senders` to `receivers`; every
    edge outside it is left intact in every run."""
    metric = as_metric(metric)
    if ablation not in ABLATIONS:
        raise PatchingError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    pairs = make_pairs(model, clean, corrupted, direction="noise", align=None)  # base = clean, source = corrupted
    if ablation == "position_mean" and len({p.n_base for p in pairs}) > 1:
        raise PatchingError("ablation='position_mean' needs prompts of one token length, got lengths "
                            f"{sorted({p.n_base for p in pairs})}")
    check_run_settings(model, metric, len(pairs), lengths=run_lengths(pairs))
    senders, receivers = check_graph(model, senders, receivers)
    graph = [(u, r) for u in senders for r in receivers if reaches(u, r, model)]
    graph_set = set(graph)
    for i, circuit in enumerate(circuits):
        stray = [e for e in circuit if e not in graph_set]
        if stray:
            raise PatchingError(f"circuit {i} holds {len(stray)} edge(s) outside the graph, e.g. "
                                f"{stray[0][0].label()} -> {stray[0][1].label()}")
    missing = torch.tensor([[[(u, r) not in circuit and reaches(u, r, model) for r in receivers] for u in senders]
                            for circuit in circuits])  # (circuits, senders, receivers)
    with torch.inference_mode():
        runs = [(stream_run(model, p.base, metric.readout), stream_run(model, p.source, metric.readout)) for p in pairs]
        bound, m_base, m_source = reference_metrics(metric, [(RunCache(b.logits), RunCache(s.logits)) for b, s in runs],
                                                    "noise")
        values = torch.stack([_ablated_run(model, bound, i, clean_run, ablated_outputs(model, runs, i, senders, ablation),
                                           senders, receivers, missing)
                              for i, (clean_run, _) in enumerate(runs)])
    return values, m_base, m_source  # noise: base is clean, source is corrupted


def faithfulness(model: Any, clean: Prompts, corrupted: Prompts, metric: Any, circuit: set[Edge], *,
                 senders: Sequence[Node], receivers: Sequence[Receiver], ablation: str = "resample") -> Faithfulness:
    """Faithfulness of `circuit` and completeness (faithfulness of its complement in the graph of
    `senders` × `receivers`); see the module docstring."""
    senders, receivers = check_graph(model, senders, receivers)
    graph = {(u, r) for u in senders for r in receivers if reaches(u, r, model)}
    values, m_clean, m_corrupted = edge_ablated_metrics(model, clean, corrupted, metric,
                                                        [set(circuit), graph - set(circuit), set()],
                                                        senders=senders, receivers=receivers, ablation=ablation)
    empty = values[:, 2]
    span = m_clean - empty
    if (span.abs() < 1e-6).any():
        raise PatchingError(f"ablating every edge of the graph leaves the metric at its clean value (pairs "
                            f"{torch.nonzero(span.abs() < 1e-6).flatten().tolist()}): faithfulness is undefined")
    return Faithfulness(faithfulness=(values[:, 0] - empty) / span, completeness=(values[:, 1] - empty) / span,
                        metric_circuit=values[:, 0], metric_complement=values[:, 1], metric_empty=empty,
                        metric_clean=m_clean, metric_corrupted=m_corrupted, n_edges=len(circuit), ablation=ablation)


def _ablated_run(model: Any, metric: Metric, pair_index: int, clean: StreamRun, corrupt: dict[Node, Tensor],
                 senders: list[Node], receivers: list[Receiver], missing: Tensor) -> Tensor:
    """One row per circuit: the clean run with each missing edge carrying the sender's ablated output."""
    rows = missing.shape[0]
    live: dict[Node, Tensor] = {}  # each sender's output in the current rows, (rows, pos, d_model)
    hooks = _capture_hooks(model, senders, live)
    by_key: dict[tuple[int, str], list[int]] = {}
    for j, r in enumerate(receivers):
        by_key.setdefault((r.layer, r.kind) if r.kind != "logits" else (-1, "logits"), []).append(j)
    for (layer, kind), columns in by_key.items():
        name = (Site(tl_compat.n_layers(model) - 1, "resid_post").hook_name if kind == "logits"
                else tl_paths.input_hook_name(layer, kind))
        hooks.append((name, _ablation_hook(receivers, columns, senders, missing, live, corrupt)))
    start = clean.acts[Site(0, "resid_pre").hook_name][None].expand(rows, -1, -1)
    with tl_paths.node_inputs(model), tl_compat.hooks(model, hooks):
        final = tl_compat.run_blocks(model, start, 0)
    return metric(readout_logits(model, final, metric.readout), torch.full((rows,), pair_index)).cpu()


def _capture_hooks(model: Any, senders: list[Node], live: dict[Node, Tensor]) -> list[tuple[str, Any]]:
    """Hooks recording every sender's live output as the rows run."""
    hooks: list[tuple[str, Any]] = []
    embed = [u for u in senders if u.kind == "embed"]
    if embed:
        hooks.append((Site(0, "resid_pre").hook_name, lambda x: live.__setitem__(embed[0], x)))
    for layer in sorted({u.layer for u in senders if u.kind == "head"}):
        heads = [u for u in senders if u.kind == "head" and u.layer == layer]
        w_o = tl_compat.head_out_weight(model, layer)

        def record(z: Tensor, heads: list[Node] = heads, w_o: Tensor = w_o) -> None:
            for u in heads:
                live[u] = z[:, :, u.head] @ w_o[u.head]
        hooks.append((Site(layer, "z").hook_name, record))
    for u in senders:
        if u.kind == "mlp":
            hooks.append((Site(u.layer, "mlp_out").hook_name, lambda x, u=u: live.__setitem__(u, x)))
    return hooks


def _ablation_hook(receivers: list[Receiver], columns: list[int], senders: list[Node], missing: Tensor,
                   live: dict[Node, Tensor], corrupt: dict[Node, Tensor]) -> Any:
    """A hook on one block's q/k/v (or MLP, or final) input: subtract, per row and receiver, the live
    minus corrupted output of every sender whose edge into it is missing."""
    upstream = [s for s in range(len(senders)) if bool(missing[:, s, columns].any())]

    def hook(x: Tensor) -> Tensor:
        if not upstream:
            return x
        shifts = torch.stack([live[senders[s]] - corrupt[senders[s]][None] for s in upstream])  # (S', rows, pos, d)
        weights = missing[:, upstream][:, :, columns].to(shifts.dtype)  # (rows, S', J)
        correction = torch.einsum("rsj,srpd->rjpd", weights, shifts).to(x.dtype)  # (rows, J, pos, d)
        x = x.clone()
        for c, j in enumerate(columns):
            if receivers[j].kind in ("q", "k", "v"):
                x[:, :, receivers[j].head] -= correction[:, c]
            else:
                x -= correction[:, c]
        return x
    return hook


@dataclass(frozen=True)
class CircuitConfig:
    """Settings of `find_circuit`."""

    threshold: float = 0.05
    """Keep edges whose |normalised effect| is at least this."""
    k: int | None = None
    """And at most the k of largest |effect| among them; None for no cap."""
    method: str = "eap_ig"
    """Attribution that ranks the candidates: `eap`, `eap_ig`, or `atp*` (EAP, with every edge into a
    query or key scored by the QK fix and GradDrop instead: `qk_edges.py`; unsigned there)."""
    steps: int = 8
    """Points on the path for `eap_ig`."""
    confirm: bool = True
    """Patch the candidates exactly (path patching, one edge each) and select on the exact effects."""
    ablation: str = "resample"
    """What missing edges carry when faithfulness and completeness are measured (`ABLATIONS`)."""
    curve_points: int = 8
    """Circuits measured for the threshold curve (`CircuitResult.curve`): the top n edges by |estimate|
    for n spaced geometrically up to every edge of the graph; 0 for no curve."""
    max_candidates: int = 500
    """At most this many candidates (by |estimate|) are patched exactly: each is one row of a forward
    pass, and a low threshold on a whole model's graph (~70k edges on the default) clears thousands.
    The provenance records whether the cap cut the list."""

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not self.threshold >= 0:
            raise PatchingError(f"CircuitConfig.threshold must be a number >= 0, got {self.threshold!r}")
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise PatchingError(f"CircuitConfig.k must be a positive int, got {self.k!r}")
        if isinstance(self.max_candidates, bool) or not isinstance(self.max_candidates, int) or self.max_candidates < 1:
            raise PatchingError(f"CircuitConfig.max_candidates must be a positive int, got {self.max_candidates!r}")
        if self.method not in ("eap", "eap_ig", "atp*"):
            raise PatchingError(f"CircuitConfig.method must be 'eap', 'eap_ig' or 'atp*', got {self.method!r}")
        if self.ablation not in ABLATIONS:
            raise PatchingError(f"CircuitConfig.ablation must be one of {ABLATIONS}, got {self.ablation!r}")
        if isinstance(self.curve_points, bool) or not isinstance(self.curve_points, int) or self.curve_points < 0:
            raise PatchingError(f"CircuitConfig.curve_points must be an int >= 0, got {self.curve_points!r}")


@dataclass
class CircuitResult(SavedResult):
    """The edges kept, their scores, and the circuit's faithfulness and completeness."""

    edges: list[Edge]
    """Kept edges, by decreasing |score|."""
    estimate: Tensor
    """Attribution estimate of each kept edge's normalised noising effect (mean over pairs), (edges,)."""
    exact: Tensor | None
    """Exact path-patching effect of each kept edge, (edges,), when confirmed."""
    faithfulness: Faithfulness
    """Faithfulness and completeness of the kept edges."""
    provenance: dict[str, Any]
    """Model, prompts, metric and the settings."""
    curve: CircuitCurve | None = None
    """The threshold curve, when measured (`CircuitConfig.curve_points`)."""

    def to_graph_json(self, path: str | Path) -> Path:
        """Write the circuit in the `latentpatch.graph/1` schema (docs/guides/paths.md; `graph.py`)."""
        return write_graph_json(circuit_document(self), path)

    def plot_graph(self, path: str | Path) -> Path:
        """A PNG drawing of the circuit laid out by layer, node size by influence, edge width by |weight|."""
        return plot_graph_document(circuit_document(self), path)

    def plot_curve(self, path: str | Path) -> Path:
        """A PNG of faithfulness and completeness against the number of edges kept."""
        if self.curve is None:
            raise PatchingError("this circuit has no threshold curve (find_circuit(..., curve_points=0))")
        return plot_circuit_curve(self.curve, self.faithfulness.ablation, "edges", path)

    def to_dataframe(self) -> Any:
        import pandas as pd

        return pd.DataFrame([{"sender": u.label(), "receiver": r.label(), "estimate": float(self.estimate[i]),
                              "exact": None if self.exact is None else float(self.exact[i])}
                             for i, (u, r) in enumerate(self.edges)])

    def plot(self, path: str | Path) -> Path:
        """A PNG bar chart of the kept edges' effects (exact where confirmed), faithfulness in the title."""
        score = self.exact if self.exact is not None else self.estimate
        fig, ax = subplots(figsize=(7, max(2.5, 0.25 * len(self.edges) + 1.5)))
        ax.barh(range(len(self.edges)), score.tolist(), color="tab:blue")
        ax.set_yticks(range(len(self.edges)), [f"{u.label()} -> {r.label()}" for u, r in self.edges], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("normalised noising effect" + (" (exact)" if self.exact is not None else " (estimate)"))
        ax.set_title(f"{len(self.edges)} edges: faithfulness {float(self.faithfulness.faithfulness.mean()):.3f}, "
                     f"completeness {float(self.faithfulness.completeness.mean()):.3f}", fontsize=9)
        fig.tight_layout()
        fig.savefig(Path(path), dpi=120)
        return Path(path)


def find_circuit(model: Any, clean: Prompts, corrupted: Prompts, metric: Any, *, senders: Any = None, receivers: Any = None,
                 saes: Any = None, checks: SpliceChecks | None = None, config: CircuitConfig | None = None,
                 **overrides: Any) -> CircuitResult | MixedCircuitResult:
    """Edges whose noising effect clears the threshold (at most k of them): ranked by EAP or EAP-IG
    over every edge, confirmed by exact path patching of the candidates (every edge whose estimate
    clears half the threshold, at most 4k and `max_candidates`), then scored for
    faithfulness and completeness (Marks et al. 2024). Direction is noising: each edge's effect is
    how much of the clean behaviour is lost when it alone carries the corrupted output.

    With `saes` the graph is one of nodes — heads, MLPs, and every SAE latent and error node at the
    SAEs' sites (the embedding, the input, stays intact) — and the result a `MixedCircuitResult`
    (`mixed_circuits.py`)."""
    config = resolve_config(CircuitConfig, config, overrides)
    if saes is not None:
        if senders is not None or receivers is not None:
            raise PatchingError("a circuit with saes= is a graph of nodes: give no senders= or receivers=")
        return find_mixed_circuit(model, clean, corrupted, metric, saes=saes, config=config, checks=checks)
    senders, receivers = check_graph(model, upstream_nodes(model) if senders is None else senders,
                                     receivers_of(model) if receivers is None else receivers)
    estimate = attribute_edges(model, clean, corrupted, metric, senders=senders, receivers=receivers,
                               method="eap" if config.method == "atp*" else config.method, steps=config.steps,
                               direction="noise", progress=False).mean_effect  # (S, R)
    if config.method == "atp*":
        qk = atp_star_edges(model, clean, corrupted, metric, senders, receivers)
        estimate = torch.where(torch.isnan(qk), estimate, qk)
    order = torch.argsort(estimate.flatten().abs(), descending=True, stable=True)
    cleared = int((estimate.abs() >= config.threshold / 2).sum())
    n_candidates = min(cleared, config.max_candidates, 4 * config.k if config.k is not None else cleared)
    candidates = [(i // len(receivers), i % len(receivers)) for i in order[:n_candidates].tolist()]
    candidates = [(s, r) for s, r in candidates if reaches(senders[s], receivers[r], model)]
    exact = None
    if config.confirm and candidates:
        grid = patch_paths(model, clean, corrupted, metric, edges=[(senders[s], receivers[r]) for s, r in candidates],
                           by="edge", direction="noise", progress=False)
        columns = [group[0] for group in grid.receivers]
        exact = torch.tensor([float(grid.mean_effect[grid.senders.index(senders[s]), columns.index(receivers[r])])
                              for s, r in candidates])
    score = exact if exact is not None else torch.tensor([float(estimate[s, r]) for s, r in candidates])
    ranked = torch.argsort(score.abs(), descending=True, stable=True).tolist()
    kept = [i for i in ranked if abs(float(score[i])) >= config.threshold][: config.k]
    edges = [(senders[candidates[i][0]], receivers[candidates[i][1]]) for i in kept]
    f = faithfulness(model, clean, corrupted, metric, set(edges), senders=senders, receivers=receivers,
                     ablation=config.ablation)
    pairs = make_pairs(model, clean, corrupted, direction="noise", align=None)
    extra = {"method": config.method, "steps": config.steps, "threshold": config.threshold, "k": config.k,
             "confirm": config.confirm, "n_candidates": len(candidates), "candidates_capped": cleared > n_candidates,
             "ablation": f.ablation, "n_layers": tl_compat.n_layers(model), "n_heads": tl_compat.n_heads(model),
             "n_kv_heads": tl_compat.n_kv_heads(model)}
    curve = (threshold_curve(model, clean, corrupted, metric, estimate, senders=senders, receivers=receivers,
                             points=config.curve_points, ablation=config.ablation) if config.curve_points else None)
    return CircuitResult(edges=edges, estimate=torch.tensor([float(estimate[candidates[i]]) for i in kept]),
                         exact=None if exact is None else exact[kept], faithfulness=f,
                         provenance=provenance_record(model, pairs, as_metric(metric), "noise", extra, 0), curve=curve)


def threshold_curve(model: Any, clean: Prompts, corrupted: Prompts, metric: Any, estimate: Tensor, *,
                    senders: list[Node], receivers: list[Receiver], points: int, ablation: str) -> CircuitCurve:
    """Faithfulness and completeness of the top n edges by |estimate| (senders × receivers), for up to
    `points` values of n spaced geometrically from 1 to every edge of the graph; one batched run of
    every circuit, its complement and the empty circuit per pair."""
    graph = [(s, r) for s in range(len(senders)) for r in range(len(receivers)) if reaches(senders[s], receivers[r], model)]
    graph.sort(key=lambda e: -abs(float(estimate[e])))
    counts = sorted({max(1, round(len(graph) ** (j / max(points - 1, 1)))) for j in range(points)})
    everything = {(senders[s], receivers[r]) for s, r in graph}
    circuits = [{(senders[s], receivers[r]) for s, r in graph[:n]} for n in counts]
    values, m_clean, _ = edge_ablated_metrics(model, clean, corrupted, metric,
                                              circuits + [everything - c for c in circuits] + [set()],
                                              senders=senders, receivers=receivers, ablation=ablation)
    empty = values[:, -1:]
    span = m_clean[:, None] - empty
    scores = (values[:, :-1] - empty) / span  # (pairs, 2 · points)
    return CircuitCurve(threshold=torch.tensor([abs(float(estimate[graph[n - 1]])) for n in counts]),
                        n_edges=torch.tensor(counts), faithfulness=scores[:, :len(counts)].mean(0),
                        completeness=scores[:, len(counts):].mean(0))
