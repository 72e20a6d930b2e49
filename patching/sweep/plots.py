"""PNG plots of patching results: heatmaps of layers or latents against positions, or bars."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from patching.figures import subplots

if TYPE_CHECKING:
    from patching.sweep.results import PatchResult


def plot_result(result: "PatchResult", path: Path, *, top_k: int = 20) -> Path:
    """Heatmap of positions × top latents (latent units with one position), layers × positions
    (raw residual units), else a bar chart of the top units."""
    units = result.units
    single = all(len(u.parts) == 1 and u.position is not None for u in units)
    if units and single and all(u.kind == "raw" for u in units):
        return _heatmap(result, path, row_of=lambda u: u.parts[0].site.layer, row_label="layer", top_k=None)
    if units and single and all(u.kind == "latent" and u.latent is not None for u in units):
        return _heatmap(result, path, row_of=lambda u: (u.site.hook_name, u.latent), row_label="latent", top_k=top_k)
    return _bars(result, path, top_k=top_k)


def _heatmap(result: "PatchResult", path: Path, *, row_of, row_label: str, top_k: int | None) -> Path:
    effects = result.mean_effect
    tokens = result.base_tokens[0] if result.base_tokens else []
    n_pos = max([u.position for u in result.units] + [len(tokens) - 1]) + 1
    rows: dict[object, torch.Tensor] = {}
    for unit, value in zip(result.units, effects.tolist()):
        rows.setdefault(row_of(unit), torch.zeros(n_pos))[unit.position] = value
    keys = sorted(rows, key=lambda key: -rows[key].abs().max().item())[:top_k] if top_k else sorted(rows)
    grid = torch.stack([rows[key] for key in keys]) if keys else torch.zeros(1, n_pos)
    limit = max(grid.abs().max().item(), 1e-9)
    fig, ax = subplots(figsize=(max(6, 0.6 * n_pos + 2), max(3, 0.3 * len(keys) + 1.5)))
    image = ax.imshow(grid.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(n_pos), [f"{i}:{tokens[i]!r}" if i < len(tokens) else str(i) for i in range(n_pos)],
                  rotation=60, ha="right", fontsize=7)
    labels = [f"{k[0].split('.hook_')[0]} #{k[1]}" if isinstance(k, tuple) else str(k) for k in keys]
    ax.set_yticks(range(len(keys)), labels, fontsize=7)
    ax.set_ylabel(row_label)
    ax.set_title(f"{result.method} {result.direction} effect (mean over {result.effect.shape[0]} pair(s))", fontsize=9)
    fig.colorbar(image, ax=ax, label="normalized effect")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _bars(result: "PatchResult", path: Path, *, top_k: int) -> Path:
    top = result.top(top_k)
    fig, ax = subplots(figsize=(8, max(3, 0.3 * len(top) + 1.5)))
    ax.barh(range(len(top)), [entry.effect for entry in top], color="tab:blue")
    ax.set_yticks(range(len(top)), [entry.label[:60] for entry in top], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("normalized effect")
    ax.set_title(f"{result.method} {result.direction}: top {len(top)} units", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
