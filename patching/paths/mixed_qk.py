"""AtP* node scores for a mixed graph (heads, MLPs, SAE latents, error nodes): the QK fix and GradDrop.

Kramár et al. 2024 ("AtP*", §3.1.1) fix attribution for query and key nodes: where the attention
softmax saturates, `Δ · ∂M/∂q` is near zero even when the patched query moves the attention from one
token to another, so the pattern is recomputed exactly instead. In the mixed graph a head is its
output `z[h] @ W_O[h]`, and its attribution `Δz · ∂M/∂z` already takes the exact change of `z` from
the two runs — its own softmax is never linearised — so for head nodes the QK fix changes nothing
(tests/test_mixed_qk.py checks it). Where the softmax does hide an effect is upstream: a latent, error
node, head or MLP whose term of the stream moves some head's queries or keys. For such a node u the
part of its estimate that runs straight into the queries and keys of the heads reading it directly
(`Δu · ∂M/∂(q, k input)`, the linearised share) is replaced by the exact change of those heads'
patterns against ∂M/∂pattern: block L's pattern recomputed by TransformerLens's own attention with
every query input (one row) or every key input (another row) moved by Δu, everything else at the clean
run (as `qk_edges.py` does edge by edge).

GradDrop (§3.2): for every block ℓ after the node's layer, that estimate with block ℓ's writes passing
no gradient (∂M/∂n, ∂M/∂(q, k input) and ∂M/∂pattern all taken so); the score is the mean of their
absolute values (a node in the last layer keeps its one |estimate|). Unsigned: a ranking robust to
cancellation, which `find_circuit` confirms by exact patching.

Cost per pair: three forward and backward passes per block ℓ, and one attention layer per (node,
block that reads it directly, query or key).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from patching.attribution.estimators import drop_block_gradient, frozen_parameters
from patching.attribution.qk_fix import base_gradients
from patching.model import tl_compat, tl_paths
from patching.model.sites import Site
from patching.paths.edges import receiver_gradients
from patching.paths.latent_paths import encode_sites
from patching.paths.mixed_ablation import EMBED, run_values
from patching.paths.mixed_edges import direct, term_delta
from patching.paths.mixed_estimates import node_gradients, node_estimates, node_sum
from patching.paths.nodes import Node, Receiver
from patching.paths.path_patching import receiver_hooks
from patching.paths.stream import StreamRun, stream_run
from patching.sweep.engine import normalized_effect
from patching.sweep.objectives import Metric


class _PatternReady(Exception):
    """Raised once the shifted rows' pattern exists: nothing after it runs."""


def atp_star_node_scores(model: Any, saes: dict[Site, Any], metric: Metric, pairs: Sequence[Any],
                         runs: Sequence[tuple[StreamRun, StreamRun]], m_clean: Tensor,
                         m_corrupted: Tensor) -> tuple[list[Any], Tensor]:
    """Every node `node_estimates` scores, with its |normalised| AtP* score per pair, (pairs, nodes)."""
    nodes, _ = node_estimates(model, saes, metric, list(runs), "eap", 1)
    n_layers = tl_compat.n_layers(model)
    patterns = [tl_paths.attention_hook_names(model, layer)["pattern"] for layer in range(n_layers)]
    out = torch.zeros(len(runs), len(nodes))
    with frozen_parameters(model):
        for i, (clean_run, corrupted_run) in enumerate(runs):
            base = stream_run(model, pairs[i].base, metric.readout, extra=patterns)
            codes = (encode_sites(saes, clean_run), encode_sites(saes, corrupted_run))
            deltas = [term_delta(model, saes, codes, clean_run, corrupted_run, u).detach() for u in nodes]
            reads = [[layer for layer in range(n_layers) if direct(model, list(saes), u, Node("head", layer, 0))]
                     for u in nodes]
            moved = _pattern_changes(model, base, nodes, deltas, reads)
            raw = _grad_drop(model, saes, metric, i, (clean_run, corrupted_run), base, nodes, deltas, reads, moved)
            out[i] = normalized_effect(m_clean[i:i + 1] + raw[None], m_clean[i:i + 1], m_corrupted[i:i + 1], "noise")[0].abs()
    return nodes, out


def _grad_drop(model: Any, saes: dict[Site, Any], metric: Metric, pair_index: int, run: tuple[StreamRun, StreamRun],
               base: StreamRun, nodes: list[Any], deltas: list[Tensor], reads: list[list[int]],
               moved: dict[tuple[int, int], Tensor]) -> Tensor:
    """Mean over each node's dropped blocks of |AtP with its q/k share QK-fixed|, in metric units, (nodes,)."""
    n_layers = tl_compat.n_layers(model)
    drops = [list(range(u.layer + 1, n_layers)) or [None] for u in nodes]
    values = (run_values(model, saes, run[0]), run_values(model, saes, run[1]))
    receivers = [Receiver(kind, layer, h) for layer in range(n_layers) for kind in ("q", "k")  # type: ignore[arg-type]
                 for h in range(tl_compat.n_heads(model) if kind == "q" else tl_compat.n_kv_heads(model))]
    total = torch.zeros(len(nodes))
    for drop in sorted({d for ds in drops for d in ds}, key=lambda d: -1 if d is None else d):
        with drop_block_gradient(model, drop) if drop is not None else contextlib.nullcontext():
            grads = node_gradients(model, saes, metric, pair_index, run[0], run[1], "eap", 1)
            with tl_paths.node_inputs(model):
                qk = receiver_gradients(model, metric, pair_index, base, base.acts[EMBED], receivers, torch.zeros(1))
            pattern_grads = base_gradients(model, metric, pair_index, base.acts, list(range(n_layers)))
        prod = {key: (values[1][key] - values[0][key]) * grads[key] for key in grads}
        for j, u in enumerate(nodes):
            if drop not in drops[j]:
                continue
            estimate = node_sum(prod, u)
            for layer in reads[j]:
                linear = sum((deltas[j] * qk[r]).sum() for r, rec in enumerate(receivers) if rec.layer == layer)
                fixed = (moved[(j, layer)] * pattern_grads[tl_paths.attention_hook_names(model, layer)["pattern"]]).sum()
                estimate = estimate - linear + fixed
            total[j] += estimate.abs() / len(drops[j])
    return total


def _pattern_changes(model: Any, base: StreamRun, nodes: list[Any], deltas: list[Tensor], reads: list[list[int]],
                     batch_size: int = 32) -> dict[tuple[int, int], Tensor]:
    """For each (node j, block that reads it directly): block's pattern change (heads, T, S) with every
    query input moved by the node's delta, plus the change with every key input moved; `batch_size`
    nodes (two rows each) per run."""
    out: dict[tuple[int, int], Tensor] = {}
    for layer in sorted({layer for r in reads for layer in r}):
        members = [j for j, r in enumerate(reads) if layer in r and bool(deltas[j].any())]
        for lo in range(0, len(members), batch_size):
            chunk = members[lo:lo + batch_size]
            change = _layer_changes(model, base, layer, torch.stack([deltas[j] for j in chunk]))
            out.update({(j, layer): change[m] for m, j in enumerate(chunk)})
    for j, r in enumerate(reads):
        for layer in r:
            out.setdefault((j, layer), torch.zeros(()))
    return out


def _layer_changes(model: Any, base: StreamRun, layer: int, shifts: Tensor) -> Tensor:
    """Block `layer`'s pattern change (n, heads, T, S) when every query input moves by `shifts[n]` (one
    row) plus the change when every key input does (another row); TransformerLens's attention, stopped there."""
    q = [Receiver("q", layer, h) for h in range(tl_compat.n_heads(model))]
    k = [Receiver("k", layer, h) for h in range(tl_compat.n_kv_heads(model))]
    rows = [(layer, r, 0, group) for r in range(len(shifts)) for group in (q, k)]
    name = tl_paths.attention_hook_names(model, layer)["pattern"]
    captured: dict[str, Tensor] = {}

    def capture(x: Tensor) -> Tensor:
        captured["pattern"] = x
        raise _PatternReady

    start = base.acts[Site(layer, "resid_pre").hook_name][None].expand(len(rows), -1, -1)
    hooks = receiver_hooks(model, base, rows, shifts.repeat_interleave(2, 0), 0) + [(name, capture)]
    with torch.inference_mode(), tl_paths.node_inputs(model), tl_compat.hooks(model, hooks):
        with contextlib.suppress(_PatternReady):
            tl_compat.run_blocks(model, start, layer)
    change = captured["pattern"] - base.acts[name][None]  # (2n, heads, T, S)
    return change.view(len(shifts), 2, *change.shape[1:]).sum(1)
