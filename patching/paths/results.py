"""PathResult: effects of paths or edges (exact path patching, or EAP / EAP-IG estimates); and the
scores every circuit reports (`Faithfulness`, `CircuitCurve`).

One value per (pair, sender, receiver group): a group is one receiver (an edge) or several patched
together (Wang et al. 2022's "sender → all receivers"). Saved through `patching.saved.SavedResult`
(strict JSON + safetensors, atomic, nothing unpickled on load).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from patching.figures import subplots
from patching.paths.nodes import LatentNode, Node, Receiver
from patching.saved import SavedResult


@dataclass
class PathResult(SavedResult):
    """Effects of each sender's paths through each receiver group, per prompt pair."""

    senders: list[Node | LatentNode]
    """Upstream nodes, one per row: heads, MLPs, the embedding, SAE latents and error nodes."""
    receivers: list[tuple[Receiver | LatentNode, ...]]
    """Receiver groups, one per column: patched jointly within a group."""
    effect: Tensor
    """Normalised effect, (pairs, senders, groups): 1 = fully restores (denoise) / destroys (noise)."""
    metric: Tensor
    """Metric value of each path-patched run (or M_base + estimate), (pairs, senders, groups)."""
    metric_clean: Tensor
    """M on each pair's clean prompt, (pairs,)."""
    metric_corrupted: Tensor
    """M on each pair's corrupted prompt, (pairs,)."""
    direction: str
    """`denoise` or `noise`."""
    method: str
    """`exact` (path patching), `eap` or `eap_ig`."""
    base_tokens: list[list[str]]
    """String tokens of each pair's base prompt."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Model, prompts, metric, direction, library version and the call's settings."""

    @property
    def mean_effect(self) -> Tensor:
        """(senders, groups): mean over pairs."""
        return self.effect.mean(0)

    def group_label(self, g: int) -> str:
        group = self.receivers[g]
        return group[0].label() if len(group) == 1 else f"{len(group)} receivers"

    def top(self, k: int = 10) -> list[tuple[str, str, float]]:
        """The k (sender, receiver group, mean effect) entries of largest magnitude."""
        flat = self.mean_effect.flatten()
        order = torch.argsort(flat.abs(), descending=True, stable=True)[:k].tolist()
        n_groups = len(self.receivers)
        return [(self.senders[i // n_groups].label(), self.group_label(i % n_groups), float(flat[i])) for i in order]

    def to_dataframe(self) -> Any:
        """One row per (sender, receiver group): labels, mean effect, per-pair effects."""
        import pandas as pd

        rows = []
        for s, sender in enumerate(self.senders):
            for g in range(len(self.receivers)):
                row = {"sender": sender.label(), "receivers": self.group_label(g), "effect": float(self.mean_effect[s, g])}
                row.update({f"effect_pair{p}": float(self.effect[p, s, g]) for p in range(self.effect.shape[0])})
                rows.append(row)
        return pd.DataFrame(rows)

    def plot(self, path: str | Path, *, top_k: int = 40) -> Path:
        """A PNG heatmap of senders × receiver groups: the `top_k` senders and groups with the largest
        |effect| (cells not computed, NaN, drawn as 0)."""
        grid = self.mean_effect.nan_to_num(0.0)
        order = torch.argsort(grid.abs().amax(1), descending=True, stable=True)[:top_k].tolist()
        groups = sorted(torch.argsort(grid.abs().amax(0), descending=True, stable=True)[:top_k].tolist())
        grid = grid[order][:, groups]
        limit = max(grid.abs().max().item(), 1e-9)
        fig, ax = subplots(figsize=(max(5, 0.35 * grid.shape[1] + 3), max(3, 0.3 * len(order) + 1.5)))
        image = ax.imshow(grid.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_yticks(range(len(order)), [self.senders[i].label() for i in order], fontsize=7)
        ax.set_xticks(range(grid.shape[1]), [self.group_label(g) for g in groups], rotation=60,
                      ha="right", fontsize=7)
        ax.set_title(f"{self.method} {self.direction} path effects (mean over {self.effect.shape[0]} pair(s))", fontsize=9)
        fig.colorbar(image, ax=ax, label="normalized effect")
        fig.tight_layout()
        fig.savefig(Path(path), dpi=120)
        return Path(path)


@dataclass(frozen=True)
class Faithfulness:
    """How much of the clean-vs-corrupted gap a circuit carries, per pair."""

    faithfulness: Tensor
    """(M(C) − M(∅)) / (M_clean − M(∅)), (pairs,)."""
    completeness: Tensor
    """The same for the complement of C in the graph, (pairs,)."""
    metric_circuit: Tensor
    """M with only C intact, (pairs,)."""
    metric_complement: Tensor
    """M with only the complement intact, (pairs,)."""
    metric_empty: Tensor
    """M with every edge of the graph missing, (pairs,)."""
    metric_clean: Tensor
    """M of the clean run, (pairs,)."""
    metric_corrupted: Tensor
    """M of the corrupted run, (pairs,)."""
    n_edges: int
    """Edges in C (nodes, for a latent circuit: `latent_faithfulness`)."""
    ablation: str = "resample"
    """What a missing edge carries: `resample`, `zero`, `mean` or `position_mean`."""


ABLATIONS: tuple[str, ...] = ("resample", "zero", "mean", "position_mean")
"""What a missing edge or ablated node carries (`circuits.py`, `mixed_circuits.py`)."""


@dataclass(frozen=True)
class CircuitCurve:
    """Faithfulness and completeness as the threshold varies (Marks et al. 2024, Fig. 3), means over pairs."""

    threshold: Tensor
    """|estimate| of the last edge each circuit keeps, (points,)."""
    n_edges: Tensor
    """Edges in each circuit, (points,)."""
    faithfulness: Tensor
    """(points,)."""
    completeness: Tensor
    """(points,): the complement's faithfulness."""


def plot_circuit_curve(curve: CircuitCurve, ablation: str, unit: str, path: str | Path) -> Path:
    """A PNG of faithfulness and completeness against the number of `unit`s (edges, nodes) kept."""
    fig, ax = subplots(figsize=(6, 4))
    ax.plot(curve.n_edges.tolist(), curve.faithfulness.tolist(), marker="o", label="faithfulness")
    ax.plot(curve.n_edges.tolist(), curve.completeness.tolist(), marker="s", label="completeness")
    ax.set_xscale("log")
    ax.set_xlabel(f"{unit} kept (by |estimate|)")
    ax.set_ylabel(f"score ({ablation} ablation)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(path), dpi=120)
    return Path(path)
