"""AtP* for edges into queries and keys: the QK fix with GradDrop, edge by edge.

EAP scores an edge u → (query or key of a head) as `Δu · ∂M/∂(input)`, linear through the attention
softmax; where the softmax saturates, an edge that moves the attention from one token to another
scores near zero (Kramár et al. 2024, "AtP*", §3.1.1). The QK fix (`attribution/qk_fix.py`) for an
edge: the receiver's input takes the base stream plus the sender's output change (as in path
patching's frozen run, `path_patching.py`), TransformerLens's own attention recomputes that layer's
pattern exactly — one batch row per edge, stopped once the pattern exists — and the score is
`Σ (pattern' − pattern) · ∂M/∂pattern` over the heads the receiver feeds (a key/value head feeds its
whole group). GradDrop (§3.2, as `attribute_qk`'s `atp*`): for every block ℓ after the receiver's
layer, that sum with ∂M/∂pattern taken while block ℓ's writes pass no gradient; the score is the mean
of their absolute values (a receiver in the last layer keeps |QK fix|). It is unsigned: a ranking
robust to cancellation, not an effect size, which `find_circuit` confirms by exact path patching.

Cost: per pair, one forward and backward per block after the first receiver layer (the gradients),
and one attention layer per edge (the patterns).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from patching.attribution.estimators import drop_block_gradient, frozen_parameters
from patching.attribution.qk_fix import base_gradients
from patching.model import tl_compat, tl_paths
from patching.model.sites import Site
from patching.paths.nodes import Node, Receiver, reaches
from patching.paths.path_patching import receiver_hooks
from patching.paths.stream import StreamRun, node_delta, stream_run
from patching.sweep.engine import RunCache, normalized_effect, reference_metrics
from patching.sweep.objectives import Metric, as_metric
from patching.sweep.pairs import Prompts, make_pairs


class _PatternReady(Exception):
    """Raised by the capture hook once the receivers' layer has its pattern: nothing later runs."""


def atp_star_edges(model: Any, clean: Prompts, corrupted: Prompts, metric: Any, senders: Sequence[Node],
                   receivers: Sequence[Receiver], *, batch_size: int = 64) -> Tensor:
    """|normalised noising effect| estimates of every edge into a query or key receiver, (senders,
    receivers), mean over pairs; NaN in the columns of other receivers (see the module docstring)."""
    metric = as_metric(metric)
    pairs = make_pairs(model, clean, corrupted, direction="noise", align=None)  # base = clean, source = corrupted
    qk = [j for j, r in enumerate(receivers) if r.kind in ("q", "k")]
    out = torch.full((len(pairs), len(senders), len(receivers)), float("nan"))
    if not qk:
        return out.mean(0)
    layers = sorted({receivers[j].layer for j in qk})
    names = [tl_paths.attention_hook_names(model, layer)["pattern"] for layer in layers]
    with frozen_parameters(model):
        with torch.no_grad():  # not inference mode: the gradient passes start from these runs
            runs = [(stream_run(model, p.base, metric.readout, extra=names), stream_run(model, p.source, metric.readout))
                    for p in pairs]
        bound, m_clean, m_corrupted = reference_metrics(metric, [(RunCache(b.logits), RunCache(s.logits)) for b, s in runs],
                                                        "noise")
        for i, (base, source) in enumerate(runs):
            raw = _pair_scores(model, bound, i, base, source, senders, [receivers[j] for j in qk], layers, batch_size)
            out[i][:, qk] = (normalized_effect(m_clean[i:i + 1] + raw.flatten()[None], m_clean[i:i + 1],
                                               m_corrupted[i:i + 1], "noise").view_as(raw)).abs()
    return out.mean(0)


def _pair_scores(model: Any, metric: Metric, pair_index: int, base: StreamRun, source: StreamRun, senders: Sequence[Node],
                 receivers: list[Receiver], layers: list[int], batch_size: int) -> Tensor:
    """GradDrop-averaged |QK fix| of each (sender, q/k receiver) edge in metric units, (senders, receivers)."""
    n_layers = tl_compat.n_layers(model)
    drops = {drop: _pattern_grads(model, metric, pair_index, base, layers, drop) for drop in range(layers[0] + 1, n_layers)}
    plain = _pattern_grads(model, metric, pair_index, base, layers, None) if layers[-1] == n_layers - 1 else None
    deltas = {s: node_delta(model, base, source, u) for s, u in enumerate(senders)}
    scores = torch.zeros(len(senders), len(receivers))
    for layer in layers:
        edges = [(s, j) for j, r in enumerate(receivers) if r.layer == layer for s, u in enumerate(senders)
                 if reaches(u, r, model) and bool(deltas[s].any())]
        after = [grads for drop, grads in drops.items() if drop > layer] or [plain]
        for lo in range(0, len(edges), batch_size):
            chunk = edges[lo:lo + batch_size]
            moved = _pattern_changes(model, base, layer, [receivers[j] for _, j in chunk],
                                     torch.stack([deltas[s] for s, _ in chunk]))  # (rows, heads, T, S)
            for row, (s, j) in enumerate(chunk):
                heads = _heads_read(model, receivers[j])
                per_drop = [(moved[row, heads] * grads[layer][heads]).sum().abs() for grads in after]
                scores[s, j] = torch.stack(per_drop).mean()
    return scores


def _heads_read(model: Any, receiver: Receiver) -> list[int]:
    """The query heads whose pattern a receiver's input reaches: its own head for `q`, the key/value
    head's group for `k`."""
    if receiver.kind == "q":
        return [receiver.head]
    group = tl_compat.n_heads(model) // tl_compat.n_kv_heads(model)
    return list(range(receiver.head * group, (receiver.head + 1) * group))


def _pattern_grads(model: Any, metric: Metric, pair_index: int, base: StreamRun, layers: list[int],
                   drop: int | None) -> dict[int, Tensor]:
    """∂M/∂pattern (heads, T, S) of each layer at the base run, with block `drop`'s writes passing no
    gradient (GradDrop) when given."""
    def run() -> dict[str, Tensor]:
        return base_gradients(model, metric, pair_index, base.acts, layers)
    if drop is None:
        grads = run()
    else:
        with drop_block_gradient(model, drop):
            grads = run()
    return {layer: grads[tl_paths.attention_hook_names(model, layer)["pattern"]].detach() for layer in layers}


def _pattern_changes(model: Any, base: StreamRun, layer: int, receivers: list[Receiver], deltas: Tensor) -> Tensor:
    """Block `layer`'s pattern change (rows, heads, T, S) when row r's receiver reads the base stream
    plus `deltas[r]`, everything else at the base run: TransformerLens's attention, stopped there."""
    rows = [(layer, r, 0, [receiver]) for r, receiver in enumerate(receivers)]
    name = tl_paths.attention_hook_names(model, layer)["pattern"]
    captured: dict[str, Tensor] = {}

    def capture(x: Tensor) -> Tensor:
        captured["pattern"] = x
        raise _PatternReady

    hooks = receiver_hooks(model, base, rows, deltas, 0) + [(name, capture)]
    start = base.acts[Site(layer, "resid_pre").hook_name][None].expand(len(rows), -1, -1)
    with torch.inference_mode(), tl_paths.node_inputs(model), tl_compat.hooks(model, hooks):
        try:
            tl_compat.run_blocks(model, start, layer)
        except _PatternReady:
            pass
    return captured["pattern"] - base.acts[name][None]
