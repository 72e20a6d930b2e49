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
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from patching.attribution.estimators import frozen_parameters
from patching.errors import PatchingError
from patching.figures import subplots
from patching.model import tl_compat
from patching.model.sites import Site
from patching.paths.mixed_ablation import EMBED, Row, ablated_metrics, run_values
from patching.paths.nodes import LatentNode, Node, upstream_nodes
from patching.paths.results import ABLATIONS, CircuitCurve, Faithfulness, plot_circuit_curve
from patching.paths.stream import StreamRun, stream_run
from patching.saved import SavedResult
from patching.splice.splicer import SpliceChecks
from patching.sweep.engine import check_metric_finite, normalized_effect, readout_logits
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
    tl_compat.refuse_bridge(model, "mixed circuits", "mixed_graph")
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


def node_estimates(model: Any, resolved: dict[Site, Any], metric: Metric, runs: list[tuple[StreamRun, StreamRun]],
                   method: str, steps: int) -> tuple[list[Any], Tensor]:
    """Every head, MLP, every latent that moves between the runs of some pair and each
    error node, with its attribution estimate in metric units, (pairs, nodes): `(n_corrupted − n_clean)
    · ∂M/∂n` summed over positions, the gradient at the clean run (`eap`) or averaged along the
    embedding path (`eap_ig`, `steps` midpoints)."""
    values = [(run_values(model, resolved, c), run_values(model, resolved, s)) for c, s in runs]
    moving = {site: torch.stack([(s[f"{site.hook_name}:z"] != c[f"{site.hook_name}:z"]).any(0) for c, s in values]).any(0)
              for site in resolved}
    nodes: list[Any] = list(upstream_nodes(model, embed=False))
    for site in resolved:
        nodes += [LatentNode(site, int(i)) for i in torch.nonzero(moving[site]).flatten().tolist()] + [LatentNode(site)]
    raw = torch.zeros(len(runs), len(nodes))
    for i, (clean_run, corrupted_run) in enumerate(runs):
        grads = _gradients(model, resolved, metric, i, clean_run, corrupted_run, method, steps)
        prod = {key: (values[i][1][key] - values[i][0][key]) * grads[key] for key in grads}
        raw[i] = torch.stack([_node_sum(prod, node) for node in nodes])
    return nodes, raw


def _node_sum(prod: dict[str, Tensor], node: Node | LatentNode) -> Tensor:
    """A node's share of the per-value products (keys as `run_values`), summed over positions."""
    if isinstance(node, LatentNode):
        key = f"{node.site.hook_name}:{'e' if node.latent is None else 'z'}"
        part = prod[key] if node.latent is None else prod[key][:, node.latent]
        return part.sum() if node.pos is None else part[node.pos].sum()
    if node.kind == "head":
        return prod[Site(node.layer, "z").hook_name][:, node.head].sum()
    return prod[Site(node.layer, "mlp_out").hook_name].sum()


def _gradients(model: Any, resolved: dict[Site, Any], metric: Metric, pair_index: int, clean_run: StreamRun,
               corrupted_run: StreamRun, method: str, steps: int) -> dict[str, Tensor]:
    """∂M/∂value for every node value (keys as `run_values`), through probes added on them, at the
    clean run or averaged over `steps` points between the clean and corrupted embeddings (one row each)."""
    start, end = clean_run.acts[EMBED], corrupted_run.acts[EMBED]
    points = 1 if method == "eap" else steps
    alphas = (torch.arange(points, dtype=start.dtype) + 0.5) / points if method == "eap_ig" else torch.zeros(1)
    rows = start[None] + alphas[:, None, None] * (end - start)[None]  # (points, pos, d_model)
    probes: dict[str, Tensor] = {}

    def probe(key: str) -> Any:
        def hook(x: Tensor) -> Tensor:
            probes[key] = torch.zeros_like(x, requires_grad=True)
            return x + probes[key]
        return hook

    keys = [key for key in run_values(model, {}, clean_run)]
    hooks = [(key, probe(key)) for key in keys] + [(site.hook_name, _site_probe(site, sae, probes))
                                                   for site, sae in resolved.items()]
    with frozen_parameters(model), torch.enable_grad(), tl_compat.hooks(model, hooks):
        final = tl_compat.run_blocks(model, rows, 0)
        value = metric(readout_logits(model, final, metric.readout), torch.full((points,), pair_index))
        check_metric_finite(value.detach().cpu(), ["gradient run"] * points, pair_index)
        names = list(probes)
        grads = torch.autograd.grad(value.sum(), [probes[n] for n in names], allow_unused=True)
    return {n: (torch.zeros_like(probes[n]) if g is None else g).mean(0).detach() for n, g in zip(names, grads)}


def _site_probe(site: Site, sae: Any, probes: dict[str, Tensor]) -> Any:
    """Probes on a site's latents and error; the stream passes through unchanged (error-term mode)."""
    def hook(x: Tensor) -> Tensor:
        z = sae.encode(x)
        probes[f"{site.hook_name}:z"] = dz = torch.zeros_like(z, requires_grad=True)
        probes[f"{site.hook_name}:e"] = de = torch.zeros_like(x, requires_grad=True)
        return x + sae.decode_delta(z + dz, z).to(x.dtype) + de
    return hook


def find_mixed_circuit(model: Any, clean: Prompts, corrupted: Prompts, metric: Any, *, saes: Any, config: Any,
                       checks: SpliceChecks | None = None) -> MixedCircuitResult:
    """Nodes whose noising effect clears `config.threshold` (at most `config.k`), ranked by attribution,
    confirmed by exact patching of the candidates, scored for faithfulness and completeness (see the
    module docstring). `config` is a `CircuitConfig`; `find_circuit(..., saes=...)` calls this."""
    if config.method not in ("eap", "eap_ig"):
        raise PatchingError(f"a mixed circuit ranks nodes by 'eap' (AtP) or 'eap_ig', got method={config.method!r}")
    resolved, metric, pairs, runs, m_clean, m_corrupted = _prepare(model, saes, clean, corrupted, metric, checks,
                                                                   config.ablation)
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
    circuit = frozenset(nodes[candidates[j]] for j in kept)
    counts = _curve_counts(len(nodes), config.curve_points)
    tops = [frozenset(nodes[j] for j in order[:n]) for n in counts]
    rows: list[Row] = [(circuit, False), (circuit, True), *[(t, False) for t in tops], *[(t, True) for t in tops],
                       (frozenset(), False)]
    values = ablated_metrics(model, resolved, metric, runs, rows, config.ablation)
    empty = values[:, -1]
    f = _scores(values[:, 0], values[:, 1], empty, m_clean, m_corrupted, len(circuit), config.ablation)
    curve = None
    if counts:
        span = (m_clean - empty)[:, None]
        curve = CircuitCurve(threshold=torch.tensor([abs(float(estimate[order[n - 1]])) for n in counts]),
                             n_edges=torch.tensor(counts),
                             faithfulness=((values[:, 2:2 + len(counts)] - empty[:, None]) / span).mean(0),
                             completeness=((values[:, 2 + len(counts):-1] - empty[:, None]) / span).mean(0))
    extra = {"method": config.method, "steps": config.steps, "threshold": config.threshold, "k": config.k,
             "confirm": config.confirm, "n_nodes_scored": len(nodes), "n_candidates": len(candidates),
             "candidates_capped": cleared > n_candidates, "ablation": config.ablation, "graph": "mixed nodes",
             "checks": (checks or SpliceChecks()).to_dict()}
    return MixedCircuitResult(nodes=[nodes[candidates[j]] for j in kept], estimate=estimate[[candidates[j] for j in kept]],
                              exact=None if exact is None else exact[kept], faithfulness=f,
                              error_share=error_share(nodes, estimate), curve=curve,
                              provenance=provenance_record(model, pairs, metric, "noise", extra, 0, saes=resolved))


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
