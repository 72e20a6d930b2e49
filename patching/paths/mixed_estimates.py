"""Attribution estimates of every node of a mixed graph (Marks et al. 2024, eq. 2): each node's
`(n_corrupted − n_clean) · ∂M/∂n` summed over positions, ∂M/∂n read at zero-valued probes on every
head's `z`, every MLP's output and each SAE site's latents and error, at the clean run (`eap`) or
averaged over `steps` points of the straight path between the clean and corrupted embeddings
(`eap_ig`, Hanna et al. 2024's "inputs" form). `mixed_circuits.py` ranks nodes by them and
`mixed_edges.py` takes its downstream gradients from them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from patching.attribution.estimators import frozen_parameters
from patching.model import tl_compat
from patching.model.sites import Site
from patching.paths.mixed_ablation import EMBED, run_values
from patching.paths.nodes import LatentNode, Node, upstream_nodes
from patching.paths.stream import StreamRun
from patching.sweep.engine import check_metric_finite, readout_logits
from patching.sweep.objectives import Metric


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
        grads = node_gradients(model, resolved, metric, i, clean_run, corrupted_run, method, steps)
        prod = {key: (values[i][1][key] - values[i][0][key]) * grads[key] for key in grads}
        raw[i] = torch.stack([node_sum(prod, node) for node in nodes])
    return nodes, raw


def node_sum(prod: dict[str, Tensor], node: Node | LatentNode) -> Tensor:
    """A node's share of the per-value products (keys as `run_values`), summed over positions."""
    if isinstance(node, LatentNode):
        key = f"{node.site.hook_name}:{'e' if node.latent is None else 'z'}"
        part = prod[key] if node.latent is None else prod[key][:, node.latent]
        return part.sum() if node.pos is None else part[node.pos].sum()
    if node.kind == "head":
        return prod[Site(node.layer, "z").hook_name][:, node.head].sum()
    return prod[Site(node.layer, "mlp_out").hook_name].sum()


def node_gradients(model: Any, resolved: dict[Site, Any], metric: Metric, pair_index: int, clean_run: StreamRun,
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
