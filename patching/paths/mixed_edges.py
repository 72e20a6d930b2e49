"""Edges of a mixed graph: heads, MLPs, SAE latents and error nodes, and the logits.

Marks et al. 2024 ("Sparse Feature Circuits", §2, eq. 4; their `jvp`): the edge from an upstream
node u to a downstream node d is the share of d's attribution that reaches it straight from u,

    w(u → d) = Δu · ∂(g_d · d)/∂u,   g_d = ∂M/∂d (held constant),

at the clean run, with every node between u and d frozen: only d's own input moves. u writes a term
of the residual stream (a head's `z[h] @ W_O[h]`, an MLP's output, a latent's `f_i · W_dec[i]` or the
error at an SAE site); d reads the stream through its own input — a head through its query, key and
value inputs, an MLP through its input, a latent through its encoder (`encode(x)[i]`), an error node as
`x − decode(encode(x))`, the logits through the final norm and unembedding (g = 1: the metric itself).
An edge exists where u's term is part of the stream d reads: u writes before d reads and no SAE site
lies between them (a site is a cut: past it the stream is its latents, error and decoder bias).

So with `v_d = ∂(g_d · d)/∂x_d` (pos, d_model), the gradient of d's share with respect to the stream it
reads, every edge is `Σ_pos Δu · v_d`. One clean forward with every node input detached into its own
leaf (and one row per query head of a key/value group, so that a shared key or value input carries
one head's share per row) and one backward give `v_d` for every head, MLP and the logits; each SAE
site's latents and error get theirs from a batched vector–Jacobian product through the encoder alone.

By the chain rule the edges out of a node, summed over every node that reads it directly (every head,
MLP, latent and error node of the graph, and the logits), equal its attribution estimate
`Δu · ∂M/∂u` (`mixed_estimates.py`); with `eap_ig` the `g_d` are the path-averaged gradients while the
Jacobians stay at the clean run, as Marks et al.'s `jvp` does, and that sum is no longer exact.
Effects are normalised noising effects, as the nodes'.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from patching.attribution.estimators import frozen_parameters
from patching.model import tl_compat, tl_paths
from patching.model.sites import Site
from patching.paths.latent_paths import encode_sites, latent_delta
from patching.paths.latents import downstream_rows
from patching.paths.mixed_ablation import EMBED
from patching.paths.mixed_estimates import node_gradients
from patching.paths.nodes import LatentNode, Node, Receiver
from patching.paths.stream import StreamRun, node_delta
from patching.sweep.engine import normalized_effect, readout_logits
from patching.sweep.objectives import Metric

LOGITS = Receiver("logits")
"""The downstream end of the graph: the metric read from the final residual stream."""

Upstream = Node | LatentNode
Downstream = Node | LatentNode | Receiver


class MixedEdges(NamedTuple):
    """The edges between a set of mixed-graph nodes and into the logits."""

    edges: list[tuple[Upstream, Downstream]]
    """(upstream, downstream) for every direct pair, in the order of the nodes given; the logits are `LOGITS`."""
    effect: Tensor
    """Normalised noising effect of each edge, (pairs, edges)."""


def read_slot(model: Any, node: Downstream) -> float:
    """Where `node` reads the residual stream (`nodes.Receiver.read_slot`'s scale)."""
    if isinstance(node, (LatentNode, Receiver)):
        return float(node.read_slot(model))
    kind = "q" if node.kind == "head" else "mlp"
    return float(Receiver(kind, node.layer, 0 if node.kind == "head" else None).read_slot(model))


def direct(model: Any, sites: Sequence[Site], up: Upstream, down: Downstream) -> bool:
    """Whether `up`'s term is part of the stream `down` reads: written before, no SAE site between."""
    write, read = float(up.write_slot), read_slot(model, down)
    return write < read and not any(write < LatentNode(site).write_slot < read for site in sites)


def edge_effects(model: Any, saes: dict[Site, Any], metric: Metric, runs: Sequence[tuple[StreamRun, StreamRun]],
                 nodes: Sequence[Upstream], m_clean: Tensor, m_corrupted: Tensor, *, method: str = "eap",
                 steps: int = 8, batch_size: int = 64) -> MixedEdges:
    """Every edge between `nodes` (checked) and from them into the logits, per pair of `runs`
    (clean, corrupted), as the module docstring defines them."""
    downstream: list[Downstream] = [*nodes, LOGITS]
    pairs = [(u, d) for u in nodes for d in downstream if direct(model, list(saes), u, d)]
    raw = torch.zeros(len(runs), len(pairs))
    if not pairs:
        return MixedEdges(edges=[], effect=raw)
    up_index = {u: j for j, u in enumerate(dict.fromkeys(u for u, _ in pairs))}
    down_index = {d: j for j, d in enumerate(dict.fromkeys(d for _, d in pairs))}
    for i, (clean_run, corrupted_run) in enumerate(runs):
        grads = node_gradients(model, saes, metric, i, clean_run, corrupted_run, method, steps)
        codes = (encode_sites(saes, clean_run), encode_sites(saes, corrupted_run))
        reads = _reader_vectors(model, saes, metric, i, clean_run, grads, list(down_index), batch_size)  # (D, pos, d)
        with torch.no_grad():  # W_O is a parameter: a head's delta would otherwise carry a graph
            deltas = torch.stack([term_delta(model, saes, codes, clean_run, corrupted_run, u) for u in up_index])  # (U, pos, d)
            dots = torch.einsum("upd,vpd->uv", deltas.float(), reads.float())
        raw[i] = torch.stack([dots[up_index[u], down_index[d]] for u, d in pairs])
    effect = normalized_effect(m_clean[:, None] + raw, m_clean, m_corrupted, "noise")
    return MixedEdges(edges=pairs, effect=effect)


def term_delta(model: Any, saes: dict[Site, Any], codes: tuple[Any, Any], clean: StreamRun, corrupted: StreamRun,
           node: Upstream) -> Tensor:
    """Corrupted minus clean of the term `node` writes to the stream, (pos, d_model)."""
    if isinstance(node, LatentNode):
        return latent_delta(saes, codes[0], codes[1], node)
    return node_delta(model, clean, corrupted, node)


def _reader_vectors(model: Any, saes: dict[Site, Any], metric: Metric, pair_index: int, clean: StreamRun,
                    grads: dict[str, Tensor], downstream: list[Downstream], batch_size: int) -> Tensor:
    """`v_d` of every downstream node, (nodes, pos, d_model)."""
    model_readers = [d for d in downstream if not isinstance(d, LatentNode)]
    by_reader = _model_reader_vectors(model, metric, pair_index, clean, grads, model_readers) if model_readers else {}
    for site, sae in saes.items():
        here = [d for d in downstream if isinstance(d, LatentNode) and d.site == site]
        for lo in range(0, len(here), batch_size):
            chunk = here[lo:lo + batch_size]
            vectors = _site_vectors(sae, clean.acts[site.hook_name], grads[f"{site.hook_name}:z"],
                                    grads[f"{site.hook_name}:e"], chunk)
            by_reader.update(zip(chunk, vectors))
    return torch.stack([by_reader[d] for d in downstream])


def _model_reader_vectors(model: Any, metric: Metric, pair_index: int, clean: StreamRun, grads: dict[str, Tensor],
                          readers: list[Downstream]) -> dict[Downstream, Tensor]:
    """`v_d` of heads, MLPs and the logits from one clean forward whose node inputs are detached leaves:
    row r scores the query heads h with h mod group = r (a key/value input then carries one head's
    share), row 0 also every MLP and the metric."""
    n_heads, n_kv = tl_compat.n_heads(model), tl_compat.n_kv_heads(model)
    group = n_heads // n_kv
    leaves: dict[tuple[int, str], Tensor] = {}
    values: dict[tuple[int, str], Tensor] = {}

    def leaf(key: tuple[int, str]) -> Any:
        def hook(x: Tensor) -> Tensor:
            leaves[key] = x.detach().requires_grad_(True)
            return leaves[key]
        return hook

    def keep(key: tuple[int, str]) -> Any:
        def hook(x: Tensor) -> Tensor:
            values[key] = x
            return x
        return hook

    layers = sorted({d.layer for d in readers if isinstance(d, Node)})
    kinds = {layer: sorted({"head" if d.kind == "head" else "mlp" for d in readers if isinstance(d, Node) and d.layer == layer})
             for layer in layers}
    hooks = []
    for layer in layers:
        if "head" in kinds[layer]:
            hooks += [(tl_paths.input_hook_name(layer, k), leaf((layer, k))) for k in ("q", "k", "v")]
            hooks.append((Site(layer, "z").hook_name, keep((layer, "z"))))
        if "mlp" in kinds[layer]:
            hooks += [(tl_paths.input_hook_name(layer, "mlp"), leaf((layer, "mlp"))),
                      (Site(layer, "mlp_out").hook_name, keep((layer, "mlp_out")))]
    rows = clean.acts[EMBED].clone()[None].expand(group, -1, -1)  # a copy: the cached runs are inference tensors
    mine = (torch.arange(n_heads) % group)[None, :] == torch.arange(group)[:, None]  # (rows, heads)
    with frozen_parameters(model), torch.enable_grad(), tl_paths.node_inputs(model), tl_compat.hooks(model, hooks):
        final = tl_compat.run_blocks(model, rows, 0)[:1].detach().requires_grad_(True)
        total = metric(readout_logits(model, final, metric.readout), torch.tensor([pair_index])).sum()
        for layer in layers:
            if "head" in kinds[layer]:
                g = grads[Site(layer, "z").hook_name]  # (pos, heads, d_head)
                total = total + (values[(layer, "z")] * g[None] * mine[:, None, :, None]).sum()
            if "mlp" in kinds[layer]:
                total = total + (values[(layer, "mlp_out")][0] * grads[Site(layer, "mlp_out").hook_name]).sum()
        keys = list(leaves)
        found = torch.autograd.grad(total, [leaves[k] for k in keys] + [final], allow_unused=True)
    got = {k: (torch.zeros_like(leaves[k]) if g is None else g).detach() for k, g in zip(keys, found)}
    out: dict[Downstream, Tensor] = {}
    for d in readers:
        if isinstance(d, Receiver):
            out[d] = torch.zeros_like(final[0]) if found[-1] is None else found[-1][0].detach()
        elif d.kind == "mlp":
            out[d] = got[(d.layer, "mlp")][0]
        else:
            row, kv = d.head % group, d.head // group
            out[d] = got[(d.layer, "q")][row, :, d.head] + got[(d.layer, "k")][row, :, kv] + got[(d.layer, "v")][row, :, kv]
    return out


def _site_vectors(sae: Any, x: Tensor, grad_z: Tensor, grad_e: Tensor, chunk: list[LatentNode]) -> Tensor:
    """`v_d` of latents and error nodes at one site, (rows, pos, d_in): `g_d · d` differentiated
    through the encoder (a latent) or `x − decode(encode(x))` (the error) alone."""
    row_z, row_e = downstream_rows(chunk, (grad_z, grad_e))
    with torch.enable_grad():
        leaf = x.clone().requires_grad_(True)  # a copy: the cached runs are inference tensors
        z = sae.encode(leaf)
        error = leaf - sae.decode(z).to(leaf.dtype)
        (found,) = torch.autograd.grad([z, error], [leaf], grad_outputs=[row_z.to(z.dtype), row_e.to(error.dtype)],
                                       is_grads_batched=True, allow_unused=True)
    return torch.zeros(len(chunk), *x.shape) if found is None else found.detach()
