"""One reference run seen as a residual stream: each node's write and each receiver's read.

Path patching and edge attribution both need, for a prompt, every upstream node's output (the terms
of the residual stream) and the stream every receiver reads. One forward pass caches `hook_z`,
`hook_mlp_out`, `hook_resid_pre` and `hook_resid_mid` of every block and the final residual; a head's
output is `z[head] @ W_O[head]` (its share of `hook_attn_out` without `b_O`, which belongs to no head).
`ablated_outputs` says what a node carries instead when it is ablated (circuits) or intervened on (EAP).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from patching.model import tl_compat, tl_paths
from patching.model.sites import Site
from patching.paths.nodes import Node, Receiver
from patching.sweep.engine import readout_logits


@dataclass
class StreamRun:
    """One prompt's run (batch dimension dropped)."""

    logits: Tensor
    """Logits at the metric's readout position (vocab,), or every position (pos, vocab)."""
    final: Tensor
    """The final residual stream, before the final norm, (pos, d_model)."""
    acts: dict[str, Tensor]
    """Cached activations by hook name, each (pos, ...)."""
    keys_values: Any = None
    """The run's frozen key-value cache when kept (base runs): rows that change nothing before a
    position run only from there, after a slice of it."""


def stream_hook_names(model: object) -> list[str]:
    names = []
    for layer in range(tl_compat.n_layers(model)):
        names += [Site(layer, "z").hook_name, Site(layer, "resid_pre").hook_name]
        if tl_paths.has_mlps(model):
            names.append(Site(layer, "mlp_out").hook_name)
            if not tl_paths.parallel_blocks(model):
                names.append(Site(layer, "resid_mid").hook_name)
    return names


def stream_run(model: object, tokens: Tensor, readout: int | None, *, keys_values: bool = False,
               extra: Sequence[str] = ()) -> StreamRun:
    """Run `tokens` (one row) once, keeping what `node_output` and `read_stream` need, the `extra`
    hook names (SAE sites) and, with `keys_values`, the keys and values."""
    kv = None
    names = list(dict.fromkeys(stream_hook_names(model) + list(extra)))
    with torch.no_grad():
        if keys_values:
            final, acts, kv = tl_compat.run_until_end_with_keys_values(model, tokens, names)
        else:
            final, acts = tl_compat.run_until_end_with_cache(model, tokens, names)
        logits = readout_logits(model, final, readout)[0]
    return StreamRun(logits=logits, final=final[0], acts={name: act[0] for name, act in acts.items()}, keys_values=kv)


def node_output(model: object, run: StreamRun, node: Node) -> Tensor:
    """What `node` writes to the residual stream in `run`, (pos, d_model)."""
    if node.kind == "embed":
        return run.acts[Site(0, "resid_pre").hook_name]
    if node.kind == "mlp":
        return run.acts[Site(node.layer, "mlp_out").hook_name]
    z = run.acts[Site(node.layer, "z").hook_name][:, node.head]  # (pos, d_head)
    return z @ tl_compat.head_out_weight(model, node.layer)[node.head]


def node_delta(model: object, base: StreamRun, source: StreamRun, node: Node) -> Tensor:
    """Source minus base output of `node`, (pos, d_model)."""
    return node_output(model, source, node) - node_output(model, base, node)


def read_stream(model: object, run: StreamRun, receiver: Receiver) -> Tensor:
    """The residual stream `receiver` reads in `run`, before its norm, (pos, d_model)."""
    if receiver.kind == "logits":
        return run.final
    if receiver.kind == "mlp" and not tl_paths.parallel_blocks(model):
        return run.acts[Site(receiver.layer, "resid_mid").hook_name]
    return run.acts[Site(receiver.layer, "resid_pre").hook_name]


def ablated_outputs(model: Any, runs: list[tuple[StreamRun, StreamRun]], pair_index: int, senders: list[Node],
                    ablation: str) -> dict[Node, Tensor]:
    """What each sender's missing edges carry in pair `pair_index`, (pos, d_model) per sender: its output in
    the pair's second run (`resample`), zero, or its mean over the first runs of every pair, over prompts
    and positions (`mean`) or per position (`position_mean`, prompts of one length)."""
    clean_run, corrupted_run = runs[pair_index]
    if ablation == "resample":
        return {u: node_output(model, corrupted_run, u) for u in senders}
    if ablation == "zero":
        return {u: torch.zeros_like(node_output(model, clean_run, u)) for u in senders}
    n_pos = clean_run.final.shape[0]
    out = {}
    for u in senders:
        outputs = [node_output(model, run, u) for run, _ in runs]
        mean = (torch.stack(outputs).mean(0) if ablation == "position_mean"
                else torch.cat(outputs).mean(0, keepdim=True).expand(n_pos, -1))
        out[u] = mean
    return out
