"""Sparse feature circuits: SAE latents and error nodes as the nodes of a graph, and the edges between them.

Marks et al. 2024 ("Sparse Feature Circuits", §2 and their feature-circuits code, `jvp` in
`attribution.py`): with SAEs spliced at several residual-stream sites, the stream at site `s` is
`x_s = Σ_i f_i · W_dec[i] + b_dec + e_s`, so each latent `i` (writing `f_i · W_dec[i]`) and the
error `e_s = x_s − decode(f)` are nodes. A node's effect (AtP, Marks et al. eq. 2) is
`Δn · ∂M/∂n` at the base run, with `Δn = n_source − n_base`; ∂M/∂n is read at zero-valued probes on
the node, as the splicer's `track_grads` does. The edge from an upstream node `u` at site `a` into
a downstream node `d` at the next site `b` is

    w(u → d) = ∂M/∂n_d · (∂n_d/∂n_u) · Δn_u

at the base run: the metric's gradient at the downstream node times the Jacobian of the downstream
node (its latent value `encode(x_b)[d]`, or the error `x_b − decode(encode(x_b))`) with respect to
the upstream node, times the upstream delta. One vector–Jacobian product gives one downstream node's
row over every upstream node at once; the rows of a group run as one batched backward
(`torch.autograd.grad(..., is_grads_batched=True)`). Every site is a whole residual stream, so every
path from site a to the metric passes through site b: edges run between consecutive sites only, and
the last site's nodes feed the metric directly (their edge into it is their node effect). The
chain rule then gives the check the tests make: a node's outgoing edges, summed over every downstream
latent and error node, equal its node effect; and where the model is affine between the sites and
the downstream latents do not change sign, each edge equals exact edge patching.

With `method="ig"` the node effects and the downstream gradients are averaged along each site's own
path (the attribution room's integrated gradients, as Marks et al.'s `_pe_ig`), the Jacobian still taken at
the base run, as their `jvp` does; the outgoing-edges sum then no longer equals the node effect exactly.

Nodes are summed over positions by default (`positions=False`, as Marks et al.'s aggregated graphs)
or kept per position. Effects come back normalised as every patching result (`normalized_effect`).
The downstream error must stay differentiable with respect to the upstream nodes, which the
splicer's records (detached) are not, so the gradient pass attaches its own hooks here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from patching.attribution.estimators import frozen_parameters, path_gradients
from patching.configs import resolve_config
from patching.errors import PatchingError
from patching.figures import subplots
from patching.model import tl_compat
from patching.model.sites import Site
from patching.paths.nodes import LatentNode
from patching.paths.graph import GraphScores, latent_document, latent_scores, plot_graph_document, write_graph_json
from patching.saved import SavedResult
from patching.splice.splicer import SpliceChecks, resolve_saes, splice
from patching.sweep.engine import RunCache, normalized_effect, readout_logits, reference_metrics, reference_run
from patching.sweep.objectives import Metric, as_metric
from patching.sweep.pairs import Direction, PromptPair, Prompts, make_pairs
from patching.sweep.patch import check_run_settings, provenance_record, run_lengths

RESIDUAL_KINDS: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post")


@dataclass(frozen=True)
class LatentEdgeConfig:
    """Settings of `attribute_latent_edges`."""

    method: Literal["atp", "ig"] = "atp"
    """Node effects and the downstream gradients of the edges: at the base run (`atp`), or averaged
    along each site's own path from base to source values (`ig`, Marks et al. eq. 3; `steps` points)."""
    steps: int = 8
    """Points on the path for `ig`."""
    k: int | None = 32
    """Downstream nodes per site whose incoming edges are computed: the k of largest |mean node
    effect| (each costs one row of a batched backward); None for every node."""
    positions: bool = False
    """Keep nodes per position (True) or sum each latent and error over positions (False)."""
    direction: Direction = "denoise"
    """`denoise`: base = corrupted, source = clean; `noise`: the reverse."""
    batch_size: int = 64
    """Downstream rows per batched backward."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise PatchingError(f"LatentEdgeConfig.k must be a positive int or None, got {self.k!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise PatchingError(f"LatentEdgeConfig.batch_size must be a positive int, got {self.batch_size!r}")
        if self.direction not in ("denoise", "noise"):
            raise PatchingError(f"LatentEdgeConfig.direction must be 'denoise' or 'noise', got {self.direction!r}")
        if self.method not in ("atp", "ig"):
            raise PatchingError(f"LatentEdgeConfig.method must be 'atp' or 'ig', got {self.method!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= 1024:
            raise PatchingError(f"LatentEdgeConfig.steps must be an int in 1..1024, got {self.steps!r}")


@dataclass
class LatentGraph(SavedResult):
    """Node effects of every latent and error node that differs between the runs, and the edges
    into the chosen downstream nodes, per prompt pair."""

    sites: list[Site]
    """SAE sites in forward order."""
    nodes: list[LatentNode]
    """Every node with a non-zero delta in some pair, by site, latents then the error node."""
    node_effect: Tensor
    """Normalised AtP effect of each node, (pairs, nodes); the last site's are its edges into the metric."""
    edges: list[tuple[int, int]]
    """(upstream, downstream) indices into `nodes`, between consecutive sites."""
    edge_effect: Tensor
    """Normalised effect of each edge, (pairs, edges)."""
    node_activation: Tensor
    """Each node's value in the clean run, (pairs, nodes): the latent (summed over positions for a node
    without one), or the error's norm."""
    metric_clean: Tensor
    """M on each clean prompt, (pairs,)."""
    metric_corrupted: Tensor
    """M on each corrupted prompt, (pairs,)."""
    direction: str
    """`denoise` or `noise`."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Model, SAEs, prompts, metric, direction, library version and the settings."""

    def top_edges(self, k: int = 10) -> list[tuple[str, str, float]]:
        """The k edges of largest |mean effect| as (upstream label, downstream label, mean effect)."""
        mean = self.edge_effect.mean(0)
        order = torch.argsort(mean.abs(), descending=True, stable=True)[:k].tolist()
        return [(self.nodes[self.edges[i][0]].label(), self.nodes[self.edges[i][1]].label(), float(mean[i]))
                for i in order]

    def circuit(self, threshold: float) -> set[LatentNode]:
        """The nodes whose |mean node effect| is at least `threshold` (Marks et al.'s node threshold),
        ready for `latent_faithfulness`."""
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
            raise PatchingError(f"threshold must be a number >= 0, got {threshold!r}")
        mean = self.node_effect.mean(0)
        return {node for j, node in enumerate(self.nodes) if abs(float(mean[j])) >= threshold}

    def scores(self) -> GraphScores:
        """circuit-tracer's replacement and completeness scores of the whole graph (`graph.py`)."""
        return latent_scores(self)

    def to_graph_json(self, path: str | Path, *, threshold: float = 0.0, labels: dict[LatentNode, str] | None = None) -> Path:
        """Write the graph (edges with |mean effect| ≥ threshold) in the `latentpatch.graph/1` schema."""
        return write_graph_json(latent_document(self, threshold=threshold, labels=labels), path)

    def plot_graph(self, path: str | Path, *, threshold: float = 0.0, labels: dict[LatentNode, str] | None = None) -> Path:
        """A PNG drawing of the graph laid out by layer and position (`graph.plot_graph_document`)."""
        return plot_graph_document(latent_document(self, threshold=threshold, labels=labels), path)

    def to_dataframe(self) -> Any:
        import pandas as pd

        mean = self.edge_effect.mean(0)
        return pd.DataFrame([{"upstream": self.nodes[u].label(), "downstream": self.nodes[d].label(),
                              "effect": float(mean[i])} for i, (u, d) in enumerate(self.edges)])

    def plot(self, path: str | Path, *, top_k: int = 30) -> Path:
        """A PNG bar chart of the `top_k` edges of largest |mean effect|."""
        top = self.top_edges(top_k)
        fig, ax = subplots(figsize=(7, max(2.5, 0.25 * len(top) + 1.5)))
        ax.barh(range(len(top)), [w for _, _, w in top], color="tab:purple")
        ax.set_yticks(range(len(top)), [f"{u} -> {d}" for u, d, _ in top], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"normalised {self.direction} effect (mean over {self.edge_effect.shape[0]} pair(s))")
        fig.tight_layout()
        fig.savefig(Path(path), dpi=120)
        return Path(path)


def _stream_order(site: Site) -> tuple[int, int]:
    """Forward order of residual sites; resid_post of layer L is the stream resid_pre of L+1 reads,
    and its hook fires first."""
    return {"resid_pre": (2 * site.layer, 1), "resid_mid": (2 * site.layer + 1, 0),
            "resid_post": (2 * site.layer + 2, 0)}[site.kind]


def check_latent_sites(model: Any, saes: Any, checks: SpliceChecks | None) -> dict[Site, Any]:
    """The SAEs by site in forward order; every site a whole residual stream, no two the same stream."""
    resolved = resolve_saes(model, saes, checks=checks)
    odd = [str(site) for site in resolved if site.kind not in RESIDUAL_KINDS or site.head is not None]
    if odd:
        raise PatchingError(f"latent edges need SAEs on the residual stream ({', '.join(RESIDUAL_KINDS)}), got {odd}: "
                            "a site that sees only part of the stream is no cut between layers")
    ordered = sorted(resolved, key=_stream_order)
    for a, b in zip(ordered, ordered[1:]):
        if _stream_order(a)[0] == _stream_order(b)[0]:
            raise PatchingError(f"{a} and {b} read the same residual stream; splice one SAE per stream")
    return {site: resolved[site] for site in ordered}


def attribute_latent_edges(model: Any, saes: Any, clean: Prompts, corrupted: Prompts, metric: Any, *,
                           config: LatentEdgeConfig | None = None, checks: SpliceChecks | None = None,
                           **overrides: Any) -> LatentGraph:
    """Node effects of every latent and error node at the SAEs' sites, and the edges into the k
    strongest downstream nodes of each later site (see the module docstring)."""
    config = resolve_config(LatentEdgeConfig, config, overrides)
    metric = as_metric(metric)
    if metric.readout is None:
        raise PatchingError("latent edges need a metric that reads one position (e.g. LogitDiff(position=-1))")
    pairs = make_pairs(model, clean, corrupted, direction=config.direction, align=None)
    check_run_settings(model, metric, len(pairs), lengths=run_lengths(pairs))
    resolved = check_latent_sites(model, saes, checks)
    sites = list(resolved)
    start, layers = min(site.layer for site in sites), sorted({site.layer for site in sites})
    with frozen_parameters(model):
        with splice(model, resolved, checks=checks) as state:
            with torch.no_grad():
                runs = [(reference_run(model, state, p.base, layers, metric.readout),
                         reference_run(model, state, p.source, layers, metric.readout)) for p in pairs]
            metric, m_clean, m_corrupted = reference_metrics(metric, runs, config.direction)
            deltas = [{site: _site_delta(pair, base, source, site) for site in sites} for pair, (base, source) in zip(pairs, runs)]
            ig = [{site: path_gradients(model, state, base, metric, i, site, deltas[i][site], config.steps) for site in sites}
                  for i, (base, _) in enumerate(runs)] if config.method == "ig" else None
        nodes = _graph_nodes(sites, deltas, config.positions)
        raw_nodes = torch.zeros(len(pairs), len(nodes))
        last, left = None, []
        for i, (base, _) in enumerate(runs):  # one graph held at a time (RELIABILITY.md R12)
            last = _GradientPass(model, resolved, base, metric, i, start)
            left.append(last.grads if ig is None else ig[i])
            raw_nodes[i] = _node_scores(nodes, deltas[i], left[i])
        m_base = m_corrupted if config.direction == "denoise" else m_clean
        node_effect = normalized_effect(m_base[:, None] + raw_nodes, m_clean, m_corrupted, config.direction)

        def gradient_pass(i: int) -> _GradientPass:  # the last pair's graph is still held; the others rerun
            return last if i == len(runs) - 1 and last is not None else _GradientPass(model, resolved, runs[i][0], metric, i, start)
        edges, raw_edges = _edges(nodes, node_effect.mean(0), sites, gradient_pass, left, deltas, config)
    edge_effect = normalized_effect(m_base[:, None] + raw_edges, m_clean, m_corrupted, config.direction)
    extra = {"method": "latent_edges", "node_method": config.method, "steps": config.steps if ig else None, "k": config.k, "positions": config.positions, "n_nodes": len(nodes),
             "n_edges": len(edges), "checks": (checks or SpliceChecks()).to_dict()}
    clean_runs = [source if config.direction == "denoise" else base for base, source in runs]
    return LatentGraph(sites=sites, nodes=nodes, node_effect=node_effect, edges=edges, edge_effect=edge_effect,
                       node_activation=torch.stack([_activations(nodes, run) for run in clean_runs]),
                       metric_clean=m_clean, metric_corrupted=m_corrupted, direction=config.direction,
                       provenance=provenance_record(model, pairs, metric, config.direction, extra, 0, saes=resolved))


def _site_delta(pair: PromptPair, base: RunCache, source: RunCache, site: Site) -> tuple[Tensor, Tensor]:
    """Source minus base latents (pos, d_sae) and errors (pos, d_in) at one site."""
    return (pair.source_minus_base(source.latents[site], base.latents[site]),
            pair.source_minus_base(source.errors[site], base.errors[site]))


def _activations(nodes: list[LatentNode], run: RunCache) -> Tensor:
    """Each node's value in `run`: its latent, or its error's norm, at its position or summed."""
    out = torch.zeros(len(nodes))
    for j, node in enumerate(nodes):
        per_pos = (run.errors[node.site].norm(dim=-1) if node.latent is None
                   else run.latents[node.site][:, node.latent])
        out[j] = per_pos.sum() if node.pos is None else per_pos[node.pos]
    return out


def _graph_nodes(sites: Sequence[Site], deltas: list[dict[Site, tuple[Tensor, Tensor]]], positions: bool) -> list[LatentNode]:
    """Every latent (and error node) whose delta is non-zero in some pair, per site in forward order."""
    nodes: list[LatentNode] = []
    for site in sites:
        latent_moves = torch.stack([d[site][0] != 0 for d in deltas]).any(0)  # (pos, d_sae)
        error_moves = torch.stack([(d[site][1] != 0).any(-1) for d in deltas]).any(0)  # (pos,)
        if positions:
            nodes += [LatentNode(site, int(latent), int(pos)) for pos, latent in torch.nonzero(latent_moves).tolist()]
            nodes += [LatentNode(site, None, int(pos)) for pos in torch.nonzero(error_moves).flatten().tolist()]
        else:
            nodes += [LatentNode(site, int(latent)) for latent in torch.nonzero(latent_moves.any(0)).flatten().tolist()]
            nodes += [LatentNode(site)] if bool(error_moves.any()) else []
    return nodes


class _GradientPass:
    """One base-run forward with probes on every node and the metric's gradient at each: `grads[site]`
    is (∂M/∂z (pos, d_sae), ∂M/∂e (pos, d_in)); the graph is kept for the edges' backward passes."""

    def __init__(self, model: Any, saes: dict[Site, Any], base: RunCache, metric: Metric, pair_index: int,
                 start: int) -> None:
        self.kept: dict[Site, tuple[Tensor, Tensor, Tensor, Tensor]] = {}  # z, e, probe on z, probe on e

        def probe(site: Site) -> Any:
            sae = saes[site]

            def hook(x: Tensor) -> Tensor:  # (1, pos, d_in)
                z = sae.encode(x)
                error = x - sae.decode(z).to(x.dtype)
                dz = torch.zeros_like(z, requires_grad=True)
                de = torch.zeros_like(x, requires_grad=True)
                self.kept[site] = (z, error, dz, de)
                return x + sae.decode_delta(z + dz, z).to(x.dtype) + de
            return hook

        with torch.enable_grad(), tl_compat.hooks(model, [(site.hook_name, probe(site)) for site in saes]):
            final = tl_compat.run_blocks(model, base.resid[start][None].clone(), start)
            value = metric(readout_logits(model, final, metric.readout), torch.tensor([pair_index])).sum()
            probes = [t for site in saes for t in self.kept[site][2:]]
            grads = torch.autograd.grad(value, probes, retain_graph=True, allow_unused=True)
        self.grads = {site: tuple(torch.zeros_like(p[0]) if g is None else g[0].detach()
                                  for p, g in zip((self.kept[site][2:]), grads[2 * j:2 * j + 2]))
                      for j, site in enumerate(saes)}

    def rows_jacobian(self, down: Site, up: Site, row_z: Tensor, row_e: Tensor) -> tuple[Tensor, Tensor]:
        """For each row r, ∂(Σ row_z[r]·z_down + Σ row_e[r]·e_down)/∂(probes at `up`):
        (rows, pos, d_sae_up) and (rows, pos, d_in_up)."""
        z, error, _, _ = self.kept[down]
        _, _, dz, de = self.kept[up]
        with torch.enable_grad():
            jz, je = torch.autograd.grad([z, error], [dz, de], grad_outputs=[row_z[:, None], row_e[:, None]],
                                         is_grads_batched=True, retain_graph=True, allow_unused=True)
        jz = torch.zeros((len(row_z), *dz.shape[1:])) if jz is None else jz[:, 0]
        je = torch.zeros((len(row_e), *de.shape[1:])) if je is None else je[:, 0]
        return jz.detach(), je.detach()


def _node_scores(nodes: list[LatentNode], delta: dict[Site, tuple[Tensor, Tensor]],
                 grads: dict[Site, tuple[Tensor, ...]]) -> Tensor:
    """AtP of each node in metric units: Δz · ∂M/∂z per latent, Δe · ∂M/∂e per error node."""
    out = torch.zeros(len(nodes))
    for j, node in enumerate(nodes):
        (dz, de), (gz, ge) = delta[node.site], grads[node.site]
        per_pos = dz[:, node.latent] * gz[:, node.latent] if node.latent is not None else (de * ge).sum(-1)
        out[j] = per_pos.sum() if node.pos is None else per_pos[node.pos]
    return out


def _edges(nodes: list[LatentNode], mean_effect: Tensor, sites: list[Site], gradient_pass: Any, left: list[dict[Site, Any]],
           deltas: list[dict[Site, tuple[Tensor, Tensor]]], config: LatentEdgeConfig) -> tuple[list[tuple[int, int]], Tensor]:
    """Every edge from a site's nodes into the k strongest nodes of the next site, (pairs, edges) in metric
    units; `gradient_pass(i)` gives pair i's Jacobians (one pair's graph held at a time), `left[i]` its
    downstream gradients."""
    present = {node.site for node in nodes}
    plan = []  # (up, down, upstream node indices, downstream node indices)
    for up, down in zip(sites, sites[1:]):
        if up in present and down in present:
            ups = [j for j, node in enumerate(nodes) if node.site == up]
            downs = sorted([j for j, node in enumerate(nodes) if node.site == down],
                           key=lambda j: -abs(float(mean_effect[j])))[: config.k]
            plan.append((up, down, ups, downs))
    scores = [torch.zeros(len(deltas), len(downs), len(ups)) for _, _, ups, downs in plan]
    for i in tqdm(range(len(deltas)), desc="latent edges", disable=not config.progress or not plan, leave=False):
        grad_pass = gradient_pass(i) if plan else None
        for (up, down, ups, downs), block in zip(plan, scores):
            for lo in range(0, len(downs), config.batch_size):
                chunk = [nodes[j] for j in downs[lo:lo + config.batch_size]]
                row_z, row_e = downstream_rows(chunk, left[i][down])
                jz, je = grad_pass.rows_jacobian(down, up, row_z, row_e)
                block[i, lo:lo + len(chunk)] = _upstream_scores([nodes[j] for j in ups], jz, je, deltas[i][up])
        del grad_pass
    edges = [(u, d) for _, _, ups, downs in plan for d in downs for u in ups]
    return edges, torch.cat([block.flatten(1) for block in scores], 1) if plan else torch.zeros(len(deltas), 0)


def downstream_rows(chunk: list[LatentNode], grads: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """The left vectors of the downstream nodes: ∂M/∂n_d placed on node d's entries, zero elsewhere."""
    gz, ge = grads
    row_z = torch.zeros(len(chunk), *gz.shape)
    row_e = torch.zeros(len(chunk), *ge.shape)
    for r, node in enumerate(chunk):
        where = slice(None) if node.pos is None else node.pos
        if node.latent is None:
            row_e[r, where] = ge[where]
        else:
            row_z[r, where, node.latent] = gz[where, node.latent]
    return row_z, row_e


def _upstream_scores(ups: list[LatentNode], jz: Tensor, je: Tensor, delta: tuple[Tensor, Tensor]) -> Tensor:
    """Each row's edge from each upstream node: the Jacobian row times the upstream delta, (rows, ups)."""
    dz, de = delta
    latent_scores = jz * dz[None]  # (rows, pos, d_sae)
    error_scores = (je * de[None]).sum(-1)  # (rows, pos)
    out = torch.zeros(jz.shape[0], len(ups))
    for j, node in enumerate(ups):
        per_pos = error_scores if node.latent is None else latent_scores[:, :, node.latent]
        out[:, j] = per_pos.sum(1) if node.pos is None else per_pos[:, node.pos]
    return out
