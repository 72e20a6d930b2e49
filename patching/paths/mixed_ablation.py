"""Node-ablated runs of a mixed graph: the clean prompt with chosen heads, MLPs, SAE latents and error
nodes ablated, many node sets per forward pass (one batch row each).

A row is `(nodes, ablate_listed)`: with `ablate_listed` the listed nodes are ablated and every other
node is live; without it every node of the graph *but* the listed ones is ablated (a circuit run,
Marks et al. 2024 §3.3). The graph is every node `mixed_nodes` lists; the embedding is the input and
stays intact (so M(∅) is measured, not assumed). An ablated node's value is replaced where the forward
pass computes it — a head's `z`, an MLP's output, a latent (`x + decode(f') − decode(f)`, the splice's error-term mode) or the error (`x − e
+ e'`) — so every node downstream computes from the ablated stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from patching.model import tl_compat, tl_paths
from patching.model.sites import Site
from patching.paths.latent_paths import encode_sites
from patching.paths.nodes import LatentNode, Node
from patching.paths.stream import StreamRun
from patching.sweep.engine import check_metric_finite, readout_logits
from patching.sweep.objectives import Metric

Row = tuple[frozenset, bool]
"""(nodes, ablate_listed): see the module docstring."""

EMBED = Site(0, "resid_pre").hook_name


def run_values(model: Any, saes: dict[Site, Any], run: StreamRun) -> dict[str, Tensor]:
    """Every node's value in `run`, filed by where it is set: each layer's `z` (pos, heads, d_head) and MLP output (pos, d_model), each site's latents (pos, d_sae)
    (key `site:z`) and error (pos, d_in) (key `site:e`)."""
    out = {}
    for layer in range(tl_compat.n_layers(model)):
        out[Site(layer, "z").hook_name] = run.acts[Site(layer, "z").hook_name]
        if tl_paths.has_mlps(model):
            out[Site(layer, "mlp_out").hook_name] = run.acts[Site(layer, "mlp_out").hook_name]
    for site, (z, e) in encode_sites(saes, run).items():
        out[f"{site.hook_name}:z"], out[f"{site.hook_name}:e"] = z, e
    return out


def ablated_values(model: Any, saes: dict[Site, Any], runs: Sequence[tuple[StreamRun, StreamRun]], pair_index: int,
                   ablation: str) -> dict[str, Tensor]:
    """What every node carries when ablated in pair `pair_index` (keys as `run_values`): its value in
    the pair's corrupted run (`resample`), zero, or its mean over every clean prompt, over prompts and
    positions (`mean`) or per position (`position_mean`)."""
    clean, corrupted = runs[pair_index]
    if ablation == "resample":
        return run_values(model, saes, corrupted)
    values = run_values(model, saes, clean)
    if ablation == "zero":
        return {key: torch.zeros_like(v) for key, v in values.items()}
    every = [run_values(model, saes, run) for run, _ in runs]
    n_pos = clean.final.shape[0]
    if ablation == "position_mean":
        return {key: torch.stack([v[key] for v in every]).mean(0) for key in values}
    return {key: torch.cat([v[key] for v in every]).mean(0, keepdim=True).expand(n_pos, *values[key].shape[1:])
            for key in values}


def row_masks(model: Any, saes: dict[Site, Any], rows: Sequence[Row], n_pos: int) -> dict[str, Tensor]:
    """Which values each row ablates (keys as `run_values`): (rows,) for MLPs,
    (rows, heads) for `z`, (rows, pos, d_sae) for latents, (rows, pos) for errors."""
    n, n_heads = len(rows), tl_compat.n_heads(model)
    masks = {}
    for layer in range(tl_compat.n_layers(model)):
        masks[Site(layer, "z").hook_name] = torch.zeros(n, n_heads, dtype=torch.bool)
        if tl_paths.has_mlps(model):
            masks[Site(layer, "mlp_out").hook_name] = torch.zeros(n, dtype=torch.bool)
    for site, sae in saes.items():
        masks[f"{site.hook_name}:z"] = torch.zeros(n, n_pos, sae.d_sae, dtype=torch.bool)
        masks[f"{site.hook_name}:e"] = torch.zeros(n, n_pos, dtype=torch.bool)
    for r, (nodes, ablate_listed) in enumerate(rows):
        for node in nodes:
            _mark(masks, r, node)
        if not ablate_listed:
            for mask in masks.values():
                mask[r] = ~mask[r]
    return masks


def _mark(masks: dict[str, Tensor], row: int, node: Node | LatentNode) -> None:
    if isinstance(node, LatentNode):
        where = slice(None) if node.pos is None else node.pos
        if node.latent is None:
            masks[f"{node.site.hook_name}:e"][row, where] = True
        else:
            masks[f"{node.site.hook_name}:z"][row, where, node.latent] = True
    elif node.kind == "head":
        masks[Site(node.layer, "z").hook_name][row, node.head] = True
    else:
        masks[Site(node.layer, "mlp_out").hook_name][row] = True


def _replace(mask: Tensor, value: Tensor) -> Any:
    """A hook writing `value` where the row's mask (broadcast over the trailing dims) is set."""
    def hook(x: Tensor) -> Tensor:  # (rows, pos, d) or, for z, (rows, pos, heads, d_head)
        m = mask[:, None, :, None] if mask.dim() == 2 else mask[:, None, None]
        return torch.where(m, value[None].to(x.dtype), x)
    return hook


def _site_hook(sae: Any, mask_z: Tensor, mask_e: Tensor, z_value: Tensor, e_value: Tensor) -> Any:
    """At an SAE site: masked latents take `z_value`, masked positions' errors take `e_value`."""
    def hook(x: Tensor) -> Tensor:  # (rows, pos, d_in)
        z = sae.encode(x)
        z_new = torch.where(mask_z, z_value[None].to(z.dtype), z)
        error = x - sae.decode(z).to(x.dtype)
        shift = torch.where(mask_e[..., None], e_value[None].to(x.dtype) - error, torch.zeros((), dtype=x.dtype))
        return x + sae.decode_delta(z_new, z).to(x.dtype) + shift
    return hook


def ablated_metrics(model: Any, saes: dict[Site, Any], metric: Metric, runs: Sequence[tuple[StreamRun, StreamRun]],
                    rows: Sequence[Row], ablation: str, batch_size: int = 32) -> Tensor:
    """M of each pair's clean prompt under each row's ablation, (pairs, rows)."""
    out = torch.empty(len(runs), len(rows))
    with torch.inference_mode():
        for i, (clean, _) in enumerate(runs):
            values = ablated_values(model, saes, runs, i, ablation)
            n_pos = clean.final.shape[0]
            for lo in range(0, len(rows), batch_size):
                chunk = rows[lo:lo + batch_size]
                masks = row_masks(model, saes, chunk, n_pos)
                hooks = [(key, _replace(mask, values[key])) for key, mask in masks.items() if ":" not in key]
                hooks += [(site.hook_name, _site_hook(sae, masks[f"{site.hook_name}:z"], masks[f"{site.hook_name}:e"],
                                                      values[f"{site.hook_name}:z"], values[f"{site.hook_name}:e"]))
                          for site, sae in saes.items()]
                with tl_compat.hooks(model, hooks):
                    final = tl_compat.run_blocks(model, clean.acts[EMBED][None].expand(len(chunk), -1, -1), 0)
                value = metric(readout_logits(model, final, metric.readout), torch.full((len(chunk),), i)).cpu()
                check_metric_finite(value, [f"ablated row {lo + r}" for r in range(len(chunk))], i)
                out[i, lo:lo + len(chunk)] = value
    return out
