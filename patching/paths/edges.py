"""Edge attribution patching: every edge's patching effect from one forward and one backward pass.

EAP (Syed et al. 2023, "Attribution Patching Outperforms Automated Circuit Discovery", eq. 3): the
effect of edge u → r is estimated as `(a_u,source − a_u,base) · ∂M/∂(input of r)` at the base run,
summed over positions, where the input of r is the residual stream r reads before its norm: one
copy per query head and per key/value head (`tl_paths.node_inputs`), an MLP's input, or the final
residual for the logits. One backward pass gives the gradient at every receiver; every upstream
node's output change comes from the two reference runs. Under grouped-query attention an edge into
a key or value receiver is an edge into the shared key/value head: TransformerLens's split inputs
already carry one copy per key/value head, so no ungrouped copy of the weights is made.

EAP-IG (Hanna et al. 2024, "Have Faith in Faithfulness", §3, integrated gradients over the inputs):
the gradient averaged over `steps` points of the straight path from the base run's embeddings to the
source run's, the rest of the network recomputed at each point; the points run as one batch. The
points are the midpoints (k + 1/2) / steps, as the attribution room's `ig`, where Hanna et al.'s code
takes k / steps; both tend to the same integral.

`intervention` (`interventions.py`) says what each upstream node moves to: its source-run output
(`patch`, the default), zero, or its mean over the source runs (`mean`, `mean-positional`); `ig`
chooses EAP-IG's path: the inputs' (O(steps)) or each writing layer's own (O(steps × layers)).

Scores come back as a `PathResult` (one group per receiver) whose `metric` is M_base + estimate.
An edge whose sender writes after its receiver reads does not exist and scores 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from patching.attribution.estimators import frozen_parameters
from patching.configs import resolve_config
from patching.errors import PatchingError
from patching.model import tl_compat, tl_paths
from patching.model.sites import Site
from patching.paths.interventions import INTERVENTIONS, check_intervention, group_hook, intervened_outputs, writer_groups
from patching.paths.nodes import Node, Receiver, check_graph, reaches, receivers_of, upstream_nodes
from patching.paths.results import PathResult
from patching.paths.stream import StreamRun, node_output, stream_run
from patching.sweep.engine import RunCache, normalized_effect, readout_logits, reference_metrics
from patching.sweep.objectives import Metric, as_metric
from patching.sweep.pairs import Direction, Prompts, make_pairs
from patching.sweep.patch import check_run_settings, provenance_record, run_lengths


@dataclass(frozen=True)
class EdgeConfig:
    """Settings of `attribute_edges`."""

    method: Literal["eap", "eap_ig"] = "eap"
    """`eap`: the gradient at the base run; `eap_ig`: averaged along the inputs' path."""
    steps: int = 8
    """Points on the path for `eap_ig` (unused by `eap`)."""
    direction: Direction = "denoise"
    """`denoise`: base = corrupted, source = clean; `noise`: the reverse."""
    intervention: Literal["patch", "zero", "mean", "mean-positional"] = "patch"
    """What an upstream node is moved to (`interventions.INTERVENTIONS`): `patch` (its source-run
    output), `zero`, `mean` or `mean-positional` (its mean over the source runs)."""
    ig: Literal["inputs", "activations"] = "inputs"
    """For `eap_ig`: integrate along the embeddings' path (O(steps)), or along each writing layer's
    own path (O(steps × layers))."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.intervention not in INTERVENTIONS:
            raise PatchingError(f"EdgeConfig.intervention must be one of {INTERVENTIONS}, got {self.intervention!r}")
        if self.ig not in ("inputs", "activations"):
            raise PatchingError(f"EdgeConfig.ig must be 'inputs' or 'activations', got {self.ig!r}")
        if self.method not in ("eap", "eap_ig"):
            raise PatchingError(f"EdgeConfig.method must be 'eap' or 'eap_ig', got {self.method!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise PatchingError(f"EdgeConfig.steps must be a positive int, got {self.steps!r}")
        if self.direction not in ("denoise", "noise"):
            raise PatchingError(f"EdgeConfig.direction must be 'denoise' or 'noise', got {self.direction!r}")


def attribute_edges(model: Any, clean: Prompts, corrupted: Prompts, metric: Any, *, senders: Any = None,
                    receivers: Any = None, config: EdgeConfig | None = None, **overrides: Any) -> PathResult:
    """Estimate the effect of every edge from `senders` (default: the embedding, every head and MLP)
    into `receivers` (default: every q, k, v, MLP input and the logits); see the module docstring."""
    config = resolve_config(EdgeConfig, config, overrides)
    metric = as_metric(metric)
    if metric.readout is None:
        raise PatchingError("edge attribution needs a metric that reads one position (e.g. LogitDiff(position=-1))")
    pairs = make_pairs(model, clean, corrupted, direction=config.direction, align=None)
    check_intervention(config.intervention, [p.n_base for p in pairs])
    check_run_settings(model, metric, len(pairs), lengths=run_lengths(pairs))
    senders, receivers = check_graph(model, upstream_nodes(model) if senders is None else senders,
                                     receivers_of(model) if receivers is None else receivers)
    exists = torch.tensor([[reaches(node, r, model) for r in receivers] for node in senders])
    steps = config.steps if config.method == "eap_ig" else 1
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps if config.method == "eap_ig" else torch.zeros(1)
    scores = torch.zeros(len(pairs), len(senders), len(receivers))
    with frozen_parameters(model):
        with torch.no_grad():
            runs = [(stream_run(model, p.base, metric.readout), stream_run(model, p.source, metric.readout)) for p in pairs]
        metric, m_clean, m_corrupted = reference_metrics(metric, [(RunCache(b.logits), RunCache(s.logits)) for b, s in runs],
                                                         config.direction)
        with tl_paths.node_inputs(model):
            for i, (base, _) in enumerate(tqdm(runs, desc=config.method, disable=not config.progress, leave=False)):
                targets = intervened_outputs(model, runs, i, list(dict.fromkeys([*senders, Node("embed")])),
                                             config.intervention)
                deltas = torch.stack([targets[u] - node_output(model, base, u) for u in senders])  # (S, pos, d_model)
                scores[i] = _scores(model, metric, i, base, targets[Node("embed")], senders, receivers, deltas, alphas,
                                    per_group=config.method == "eap_ig" and config.ig == "activations") * exists
    m_base = m_corrupted if config.direction == "denoise" else m_clean
    values = m_base[:, None, None] + scores
    effect = normalized_effect(values.flatten(1), m_clean, m_corrupted, config.direction).view_as(values)
    extra = {"method": config.method, "steps": steps if config.method == "eap_ig" else None, "intervention": config.intervention,
             "ig": config.ig if config.method == "eap_ig" else None, "n_senders": len(senders),
             "n_receivers": len(receivers), "edges": int(exists.sum())}
    return PathResult(senders=senders, receivers=[(r,) for r in receivers], effect=effect, metric=values,
                      metric_clean=m_clean, metric_corrupted=m_corrupted, direction=config.direction,
                      method=config.method, base_tokens=[tl_compat.to_str_tokens(model, p.base[0]) for p in pairs],
                      provenance=provenance_record(model, pairs, metric, config.direction, extra, 0))


def _scores(model: Any, metric: Metric, pair_index: int, base: StreamRun, target_embed: Tensor, senders: list[Node],
            receivers: list[Receiver], deltas: Tensor, alphas: Tensor, per_group: bool) -> Tensor:
    """(senders, receivers) in metric units: each sender's delta against the receivers' gradient, taken
    along the inputs' path, or (`per_group`) along the path of the sender's own writing group."""
    if not per_group:
        grads = receiver_gradients(model, metric, pair_index, base, target_embed, receivers, alphas)  # (R, pos, d)
        return torch.einsum("spd,rpd->sr", deltas.float(), grads.float())
    out = torch.zeros(len(senders), len(receivers))
    for key, members in writer_groups(senders).items():
        hook = group_hook(key, deltas[members].sum(0), alphas)
        embed = target_embed if hook is None else node_output(model, base, Node("embed"))
        grads = receiver_gradients(model, metric, pair_index, base, embed, receivers, alphas, [] if hook is None else [hook])
        out[members] = torch.einsum("spd,rpd->sr", deltas[members].float(), grads.float())
    return out


def receiver_gradients(model: Any, metric: Metric, pair_index: int, base: StreamRun, target_embed: Tensor,
                       receivers: list[Receiver], alphas: Tensor, extra_hooks: Sequence[tuple[str, Any]] = ()) -> Tensor:
    """∂M/∂(each receiver's input), (receivers, pos, d_model), averaged over one row per alpha whose
    embeddings are `base + alpha · (target − base)` (and `extra_hooks` applied); run inside
    `tl_paths.node_inputs`."""
    embed = Site(0, "resid_pre").hook_name
    start = base.acts[embed][None] + alphas[:, None, None].to(base.acts[embed].dtype) * (target_embed - base.acts[embed])[None]
    keys = sorted({(r.layer, r.kind) for r in receivers if r.kind != "logits"})
    captured: dict[tuple[int, str], Tensor] = {}

    def capture(key: tuple[int, str]) -> Any:
        def hook(x: Tensor) -> Tensor:
            captured[key] = x
            return x
        return hook

    with torch.enable_grad(), tl_compat.hooks(model, [(tl_paths.input_hook_name(layer, kind), capture((layer, kind)))
                                                       for layer, kind in keys] + list(extra_hooks)):
        final = tl_compat.run_blocks(model, start.detach().requires_grad_(True), 0)
        values = metric(readout_logits(model, final, metric.readout), torch.full((len(alphas),), pair_index))
        grads = torch.autograd.grad(values.sum(), [captured[key] for key in keys] + [final], allow_unused=True)
    by_key = {key: (torch.zeros_like(captured[key]) if g is None else g).mean(0) for key, g in zip(keys, grads)}
    final_grad = grads[-1].mean(0) if grads[-1] is not None else torch.zeros_like(final[0])
    out = []
    for r in receivers:
        if r.kind == "logits":
            out.append(final_grad)
        elif r.kind == "mlp":
            out.append(by_key[(r.layer, r.kind)])
        else:
            out.append(by_key[(r.layer, r.kind)][:, r.head])  # (pos, d_model) of this head's copy
    return torch.stack(out).detach()
