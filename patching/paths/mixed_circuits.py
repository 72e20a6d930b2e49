"""Mixed circuits: attention heads, MLPs, SAE latents at several residual sites and their error nodes
as the nodes of one graph (Marks et al. 2024, "Sparse Feature Circuits", §2–3).

With SAEs spliced at residual-stream sites (error-term mode), every head's output (`z[head] @ W_O`),
every MLP's output, and at each site every latent and the error are nodes. The embedding is the input,
not a node: it stays intact (ablating it would leave nothing for completeness to measure). A circuit
is a set of them. The clean prompt runs with every node outside the circuit ablated — its value
replaced by its value in the pair's corrupted run (`resample`), zero, its mean over the clean prompts
and positions (`mean`) or per position (`position_mean`) — while the circuit's nodes compute live
from the ablated stream below them. faithfulness = (M(C) − M(∅)) / (M(full) − M(∅)) and completeness
is the same score for the complement (Marks et al. §3.3): M(full) is the clean run (nothing ablated),
M(∅) the run with every node ablated (the corrupted run under `resample` when an SAE site covers the
stream before the first head).

`find_mixed_circuit` ranks every node by its attribution estimate of the noising effect
(`(n_corrupted − n_clean) · ∂M/∂n` at the clean run, Marks et al. eq. 2; with `eap_ig`, the gradient
averaged over `steps` points of the straight path between the clean and corrupted embeddings,
Hanna et al. 2024's "inputs" form), confirms the top candidates by exact patching (the clean run with
that node alone set to its corrupted value: one batch row each), keeps those whose |effect| clears the
threshold, and scores the kept set. Nodes are summed over positions, as Marks et al.'s aggregated
graphs; a `LatentNode` with a position may still be named in a circuit by hand.

The kept nodes' edges — between them and into the logits — come with the result
(`attribute_mixed_edges`, `mixed_edges.py`: Marks et al.'s `Δu · ∂(g_d · d)/∂u` with every node
between frozen), and `to_graph_json` writes nodes and edges in the `latentpatch.graph/1` schema.
With `method="atp*"` the nodes are ranked by AtP* instead (`mixed_qk.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from patching.errors import PatchingError
from patching.figures import subplots
from patching.model import tl_compat
from patching.model.sites import Site
from patching.paths.graph import mixed_document, plot_graph_document, write_graph_json
from patching.paths.mixed_ablation import Row, ablated_metrics, run_values
from patching.paths.mixed_edges import MixedEdges, edge_effects
from patching.paths.mixed_estimates import node_estimates
from patching.paths.mixed_qk import atp_star_node_scores
from patching.paths.nodes import LatentNode, Node, Receiver, upstream_nodes
from patching.paths.results import ABLATIONS, CircuitCurve, Faithfulness, plot_circuit_curve
from patching.paths.stream import StreamRun, stream_run
from patching.saved import SavedResult
from patching.splice.splicer import SpliceChecks
from patching.sweep.engine import normalized_effect
from patching.sweep.objectives import Metric, as_metric
from patching.sweep.pairs import Prompts, make_pairs
from patching.sweep.patch import check_run_settings, provenance_record, run_lengths
from patching.paths.latents import check_latent_sites

@dataclass
class MixedCircuitResult(SavedResult):
    """The nodes kept (heads, MLPs, SAE latents, error nodes), their scores, and the
    circuit's faithfulness and completeness."""

    nodes: list[Node | LatentNode]
    """Kept nodes, by decreasing |score|."""
    estimate: Tensor
    """Attribution estimate of each kept node's normalised noising effect (mean over pairs), (nodes,)."""
    exact: Tensor | None
    """Exact noising effect of each kept node (patched alone to its corrupted value), when confirmed."""
    faithfulness: Faithfulness
    """Faithfulness and completeness of the kept nodes (`n_edges` counts nodes)."""
    error_share: float
    """Share of the SAE nodes' |estimated effect| (every latent and error node, mean over pairs) that
    the error nodes carry: how much of the behaviour the dictionaries leave unexplained."""
    provenance: dict[str, Any]
    """Model, SAEs, prompts, metric and the settings."""
    curve: CircuitCurve | None = None
    """Faithfulness and completeness of the top n nodes by |estimate|, when measured."""
    edges: list[tuple[Node | LatentNode, Node | LatentNode | Receiver]] = field(default_factory=list)
    """Edges between the kept nodes and from them into the logits (`Receiver("logits")`), as
    `mixed_edges` computes them (Marks et al. 2024), in the order of `nodes`."""
    edge_estimate: Tensor | None = None
    """Normalised noising effect of each edge (mean over pairs), (edges,); None on results saved before edges."""
    activation: Tensor | None = None
    """Each kept node's value on the clean prompts (mean over pairs), (nodes,): a latent summed over
    positions, an error node's norm summed over positions; NaN for heads and MLPs."""

    def to_graph_json(self, path: str | Path, *, labels: dict[LatentNode, str] | None = None) -> Path:
        """Write the circuit's nodes and edges in the `latentpatch.graph/1` schema (docs/guides/paths.md);
        `labels` maps a latent to its label (`labels.latent_labels`: its top activating tokens)."""
        return write_graph_json(mixed_document(self, labels=labels), path)

    def plot_graph(self, path: str | Path, *, labels: dict[LatentNode, str] | None = None) -> Path:
        """A PNG drawing of the circuit laid out by layer (`graph.plot_graph_document`)."""
        return plot_graph_document(mixed_document(self, labels=labels), path)

    def to_dataframe(self) -> Any:
        import pandas as pd

        return pd.DataFrame([{"node": node.label(), "kind": node.kind, "estimate": float(self.estimate[i]),
                              "exact": None if self.exact is None else float(self.exact[i])}
                             for i, node in enumerate(self.nodes)])

    def plot_curve(self, path: str | Path) -> Path:
        """A PNG of faithfulness and completeness against the number of nodes kept."""
        if self.curve is None:
            raise PatchingError("this circuit has no threshold curve (find_circuit(..., curve_points=0))")
        return plot_circuit_curve(self.curve, self.faithfulness.ablation, "nodes", path)

    def plot(self, path: str | Path) -> Path:
        """A PNG bar chart of the kept nodes' effects (exact where confirmed), faithfulness in the title."""
        score = self.exact if self.exact is not None else self.estimate
        fig, ax = subplots(figsize=(7, max(2.5, 0.25 * len(self.nodes) + 1.5)))
        ax.barh(range(len(self.nodes)), score.tolist(), color="tab:green")
        ax.set_yticks(range(len(self.nodes)), [node.label() for node in self.nodes], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("normalised noising effect" + (" (exact)" if self.exact is not None else " (estimate)"))
        ax.set_title(f"{len(self.nodes)} nodes: faithfulness {float(self.faithfulness.faithfulness.mean()):.3f}, "
                     f"completeness {float(self.faithfulness.completeness.mean()):.3f}, error share "
                     f"{self.error_share:.2f}", fontsize=9)
        fig.tight_layout()
        fig.savefig(Path(path), dpi=120)
        return Path(path)


def mixed_nodes(model: Any, saes: Any, *, checks: SpliceChecks | None = None) -> list[Node | LatentNode]:
    """Every node of the mixed graph: every head and MLP, and at each SAE site every latent and the
    error node, in forward order of sites."""
    resolved = check_latent_sites(model, saes, checks)
    nodes: list[Node | LatentNode] = list(upstream_nodes(model, embed=False))
    for site, sae in resolved.items():
        nodes += [LatentNode(site, i) for i in range(sae.d_sae)] + [LatentNode(site)]
    return nodes


def _prepare(model: Any, saes: Any, clean: Prompts, corrupted: Prompts, metric: Any, checks: SpliceChecks | None,
             ablation: str, circuit: Iterable[Any] = ()) -> tuple[dict[Site, Any], Metric, list[Any],
                                                                 list[tuple[StreamRun, StreamRun]], Tensor, Tensor]:
    """Checked SAEs, metric, pairs (base = clean) and `circuit`, then each pair's clean and corrupted runs."""
    if ablation not in ABLATIONS:
        raise PatchingError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    metric = as_metric(metric)
    if metric.readout is None:
        raise PatchingError("mixed circuits need a metric that reads one position (e.g. LogitDiff(position=-1))")
    pairs = make_pairs(model, clean, corrupted, direction="noise", align=None)
    if ablation == "position_mean" and len({p.n_base for p in pairs}) > 1:
        raise PatchingError(f"ablation='position_mean' needs prompts of one token length, got {sorted({p.n_base for p in pairs})}")
    check_run_settings(model, metric, len(pairs), lengths=run_lengths(pairs))
    resolved = check_latent_sites(model, saes, checks)
    _check_circuit(model, resolved, circuit, min(p.n_base for p in pairs))
    names = [site.hook_name for site in resolved]
    with torch.inference_mode():
        runs = [(stream_run(model, p.base, metric.readout, extra=names), stream_run(model, p.source, metric.readout, extra=names))
                for p in pairs]
    m_clean = torch.stack([metric(b.logits[None], torch.tensor([i]))[0] for i, (b, _) in enumerate(runs)]).cpu()
    m_corrupted = torch.stack([metric(s.logits[None], torch.tensor([i]))[0] for i, (_, s) in enumerate(runs)]).cpu()
    return resolved, metric, pairs, runs, m_clean, m_corrupted


def _check_circuit(model: Any, resolved: dict[Site, Any], circuit: Iterable[Any], n_pos: int) -> set[Any]:
    """The circuit as a set of checked nodes."""
    out = set()
    for node in circuit:
        if isinstance(node, LatentNode):
            node.check(model, resolved)
            if node.pos is not None and node.pos >= n_pos:
                raise PatchingError(f"{node.label()}: position out of range for prompts of {n_pos} tokens")
        elif isinstance(node, Node):
            if node.kind == "embed":
                raise PatchingError("the embedding is the input of a mixed circuit, always intact: leave Node('embed') out")
            node.check(model)
        else:
            raise PatchingError(f"circuit nodes must be Node or LatentNode values, got {type(node).__name__} ({node!r})")
        out.add(node)
    return out


def mixed_faithfulness(model: Any, saes: Any, clean: Prompts, corrupted: Prompts, metric: Any, circuit: Iterable[Any], *,
                       ablation: str = "resample", checks: SpliceChecks | None = None) -> Faithfulness:
    """Faithfulness and completeness of a circuit of heads, MLPs, SAE latents and error
    nodes (see the module docstring)."""
    circuit = list(circuit) if not isinstance(circuit, (str, Node, LatentNode)) else [circuit]
    resolved, metric, pairs, runs, m_clean, m_corrupted = _prepare(model, saes, clean, corrupted, metric, checks, ablation,
                                                                   circuit)
    circuit = set(circuit)
    rows: list[Row] = [(frozenset(circuit), False), (frozenset(circuit), True), (frozenset(), False)]
    values = ablated_metrics(model, resolved, metric, runs, rows, ablation)
    return _scores(values[:, 0], values[:, 1], values[:, 2], m_clean, m_corrupted, len(circuit), ablation)


def _scores(circuit: Tensor, complement: Tensor, empty: Tensor, m_clean: Tensor, m_corrupted: Tensor, n: int,
            ablation: str) -> Faithfulness:
    span = m_clean - empty
    if (span.abs() < 1e-6).any():
        raise PatchingError("ablating every node leaves the metric at its clean value: faithfulness is undefined")
    return Faithfulness(faithfulness=(circuit - empty) / span, completeness=(complement - empty) / span,
                        metric_circuit=circuit, metric_complement=complement, metric_empty=empty,
                        metric_clean=m_clean, metric_corrupted=m_corrupted, n_edges=n, ablation=ablation)


def attribute_mixed_edges(model: Any, saes: Any, clean: Prompts, corrupted: Prompts, metric: Any, nodes: Iterable[Any], *,
                method: str = "eap", steps: int = 8, batch_size: int = 64, checks: SpliceChecks | None = None) -> MixedEdges:
    """The edges between `nodes` (heads, MLPs, SAE latents and error nodes) and from them into the logits,
    with their normalised noising effects per pair: `Δu · ∂(g_d · d)/∂u` at the clean run, every node
    between u and d frozen (Marks et al. 2024; `mixed_edges.py`). `method` `eap_ig` averages the
    downstream gradients `g_d` along the embeddings' path (`steps` points); `batch_size` is the rows
    of one batched vector–Jacobian product through an SAE's encoder."""
    if method not in ("eap", "eap_ig"):
        raise PatchingError(f"mixed edges take method 'eap' or 'eap_ig', got {method!r}")
    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise PatchingError(f"{name} must be a positive int, got {value!r}")
    nodes = list(nodes) if not isinstance(nodes, (str, Node, LatentNode)) else [nodes]
    if not nodes:
        raise PatchingError("nodes must name at least one Node or LatentNode")
    resolved, metric, _, runs, m_clean, m_corrupted = _prepare(model, saes, clean, corrupted, metric, checks, "resample",
                                                               nodes)
    return edge_effects(model, resolved, metric, runs, list(dict.fromkeys(nodes)), m_clean, m_corrupted, method=method,
                        steps=steps, batch_size=batch_size)


def find_mixed_circuit(model: Any, clean: Prompts, corrupted: Prompts, metric: Any, *, saes: Any, config: Any,
                       checks: SpliceChecks | None = None) -> MixedCircuitResult:
    """Nodes whose noising effect clears `config.threshold` (at most `config.k`), ranked by attribution,
    confirmed by exact patching of the candidates, scored for faithfulness and completeness, and the
    edges between them (see the module docstring). `config` is a `CircuitConfig`; `find_circuit(...,
    saes=...)` calls this."""
    if config.method not in ("eap", "eap_ig", "atp*"):
        raise PatchingError(f"a mixed circuit ranks nodes by 'eap' (AtP), 'eap_ig' or 'atp*', got method={config.method!r}")
    resolved, metric, pairs, runs, m_clean, m_corrupted = _prepare(model, saes, clean, corrupted, metric, checks,
                                                                   config.ablation)
    if config.method == "atp*":  # unsigned: |normalised effect| per pair (mixed_qk.py)
        nodes, scores = atp_star_node_scores(model, resolved, metric, pairs, runs, m_clean, m_corrupted)
        estimate = scores.mean(0)
    else:
        nodes, raw = node_estimates(model, resolved, metric, runs, config.method, config.steps)
        estimate = normalized_effect(m_clean[:, None] + raw, m_clean, m_corrupted, "noise").mean(0)
    order = torch.argsort(estimate.abs(), descending=True, stable=True).tolist()
    cleared = int((estimate.abs() >= config.threshold / 2).sum())
    n_candidates = min(cleared, config.max_candidates, 4 * config.k if config.k is not None else cleared)
    candidates = order[:n_candidates]
    exact = None
    if config.confirm and candidates:
        alone = ablated_metrics(model, resolved, metric, runs, [(frozenset({nodes[c]}), True) for c in candidates], "resample")
        exact = normalized_effect(alone, m_clean, m_corrupted, "noise").mean(0)
    score = exact if exact is not None else estimate[candidates]
    ranked = torch.argsort(score.abs(), descending=True, stable=True).tolist()
    kept = [j for j in ranked if abs(float(score[j])) >= config.threshold][: config.k]
    kept_nodes = [nodes[candidates[j]] for j in kept]
    f, curve = _measure(model, resolved, metric, runs, frozenset(kept_nodes), [nodes[j] for j in order],
                        estimate[order], config, m_clean, m_corrupted)
    edges = edge_effects(model, resolved, metric, runs, kept_nodes, m_clean, m_corrupted,
                         method="eap" if config.method == "atp*" else config.method, steps=config.steps)
    extra = {"method": config.method, "steps": config.steps, "threshold": config.threshold, "k": config.k,
             "confirm": config.confirm, "n_nodes_scored": len(nodes), "n_candidates": len(candidates),
             "candidates_capped": cleared > n_candidates, "ablation": config.ablation, "graph": "mixed nodes",
             "n_layers": tl_compat.n_layers(model), "checks": (checks or SpliceChecks()).to_dict()}
    return MixedCircuitResult(nodes=kept_nodes, estimate=estimate[[candidates[j] for j in kept]],
                              exact=None if exact is None else exact[kept], faithfulness=f,
                              error_share=error_share(nodes, estimate), curve=curve, edges=edges.edges,
                              edge_estimate=edges.effect.mean(0), activation=_activation(model, resolved, runs, kept_nodes),
                              provenance=provenance_record(model, pairs, metric, "noise", extra, 0, saes=resolved))


def _measure(model: Any, resolved: dict[Site, Any], metric: Metric, runs: list[tuple[StreamRun, StreamRun]],
             circuit: frozenset, ranked: list[Any], ranked_estimate: Tensor, config: Any, m_clean: Tensor,
             m_corrupted: Tensor) -> tuple[Faithfulness, CircuitCurve | None]:
    """Faithfulness of `circuit`, and the curve of the top n of `ranked` nodes, in one batch of ablated runs."""
    counts = _curve_counts(len(ranked), config.curve_points)
    tops = [frozenset(ranked[:n]) for n in counts]
    rows: list[Row] = [(circuit, False), (circuit, True), *[(t, False) for t in tops], *[(t, True) for t in tops],
                       (frozenset(), False)]
    values = ablated_metrics(model, resolved, metric, runs, rows, config.ablation)
    empty = values[:, -1]
    f = _scores(values[:, 0], values[:, 1], empty, m_clean, m_corrupted, len(circuit), config.ablation)
    if not counts:
        return f, None
    span = (m_clean - empty)[:, None]
    return f, CircuitCurve(threshold=torch.tensor([abs(float(ranked_estimate[n - 1])) for n in counts]),
                           n_edges=torch.tensor(counts),
                           faithfulness=((values[:, 2:2 + len(counts)] - empty[:, None]) / span).mean(0),
                           completeness=((values[:, 2 + len(counts):-1] - empty[:, None]) / span).mean(0))


def _activation(model: Any, resolved: dict[Site, Any], runs: list[tuple[StreamRun, StreamRun]],
                nodes: list[Any]) -> Tensor:
    """Each node's value on the clean prompts, mean over pairs: a latent summed over positions (or at its
    own), an error node's norm likewise; NaN for heads and MLPs, whose output has no one value."""
    out = torch.full((len(runs), len(nodes)), float("nan"))
    for i, (clean_run, _) in enumerate(runs):
        values = run_values(model, resolved, clean_run)
        for j, node in enumerate(nodes):
            if isinstance(node, LatentNode):
                key = f"{node.site.hook_name}:{'e' if node.latent is None else 'z'}"
                per_pos = values[key].norm(dim=-1) if node.latent is None else values[key][:, node.latent]
                out[i, j] = per_pos.sum() if node.pos is None else per_pos[node.pos]
    return out.mean(0)


def _curve_counts(n_nodes: int, points: int) -> list[int]:
    """Up to `points` circuit sizes spaced geometrically from 1 to every scored node."""
    if not points or not n_nodes:
        return []
    return sorted({max(1, round(n_nodes ** (j / max(points - 1, 1)))) for j in range(points)})


def error_share(nodes: Sequence[Any], estimate: Tensor) -> float:
    """Σ|estimate| over error nodes / Σ|estimate| over every latent and error node (0 when none moves)."""
    sae = torch.tensor([isinstance(node, LatentNode) for node in nodes])
    errors = torch.tensor([isinstance(node, LatentNode) and node.latent is None for node in nodes])
    total = float(estimate.abs()[sae].sum())
    return float(estimate.abs()[errors].sum()) / total if total > 0 else 0.0
