"""PathResult: effects of paths or edges (exact path patching, or EAP / EAP-IG estimates).

One value per (pair, sender, receiver group): a group is one receiver (an edge) or several patched
together (Wang et al. 2022's "sender → all receivers"). Saved like `PatchResult`: a folder with
`tensors.safetensors` and `manifest.json`, written atomically, nothing unpickled on load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from patching.errors import PatchingError
from patching.figures import subplots
from patching.paths.nodes import Node, Receiver
from sae.files import atomic_folder

PATH_FORMAT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"


@dataclass
class PathResult:
    """Effects of each sender's paths through each receiver group, per prompt pair."""

    senders: list[Node]
    """Upstream nodes, one per row."""
    receivers: list[tuple[Receiver, ...]]
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

    def save(self, path: str | Path) -> Path:
        """Write the folder as one unit (`atomic_folder`)."""
        folder = Path(path)
        tensors = {"effect": self.effect, "metric": self.metric, "metric_clean": self.metric_clean,
                   "metric_corrupted": self.metric_corrupted}
        manifest = {"format_version": PATH_FORMAT_VERSION, "direction": self.direction, "method": self.method,
                    "senders": [_to_json(node) for node in self.senders],
                    "receivers": [[_to_json(r) for r in group] for group in self.receivers],
                    "base_tokens": self.base_tokens, "provenance": self.provenance}
        with atomic_folder(folder, owned=(TENSORS_FILE, MANIFEST_FILE)) as tmp:
            (tmp / TENSORS_FILE).write_bytes(save_safetensors_bytes(
                {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}))
            (tmp / MANIFEST_FILE).write_bytes(json.dumps(manifest, indent=1, allow_nan=False).encode())
        return folder

    @classmethod
    def load(cls, path: str | Path) -> "PathResult":
        folder = Path(path)
        try:
            manifest = json.loads((folder / MANIFEST_FILE).read_text())
            tensors = load_safetensors_bytes((folder / TENSORS_FILE).read_bytes())
            senders = [Node(**item) for item in manifest["senders"]]
            receivers = [tuple(Receiver(**item) for item in group) for group in manifest["receivers"]]
        except (OSError, ValueError, KeyError, TypeError, PatchingError) as err:
            raise PatchingError(f"{folder}: not a readable path result ({err})") from err
        if manifest.get("format_version", 0) > PATH_FORMAT_VERSION:
            raise PatchingError(f"{folder}: result format {manifest['format_version']} is newer than {PATH_FORMAT_VERSION}")
        if tuple(tensors["effect"].shape[1:]) != (len(senders), len(receivers)):
            raise PatchingError(f"{folder}: effects of shape {tuple(tensors['effect'].shape)} for {len(senders)} senders "
                                f"and {len(receivers)} receiver groups")
        return cls(senders, receivers, tensors["effect"], tensors["metric"], tensors["metric_clean"],
                   tensors["metric_corrupted"], manifest["direction"], manifest["method"], manifest["base_tokens"],
                   manifest["provenance"])

    def plot(self, path: str | Path, *, top_k: int = 40) -> Path:
        """A PNG heatmap of senders × receiver groups (the `top_k` senders by largest |effect|)."""
        grid = self.mean_effect
        order = torch.argsort(grid.abs().amax(1), descending=True, stable=True)[:top_k].tolist()
        grid = grid[order]
        limit = max(grid.abs().max().item(), 1e-9)
        fig, ax = subplots(figsize=(max(5, 0.35 * grid.shape[1] + 3), max(3, 0.3 * len(order) + 1.5)))
        image = ax.imshow(grid.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_yticks(range(len(order)), [self.senders[i].label() for i in order], fontsize=7)
        ax.set_xticks(range(grid.shape[1]), [self.group_label(g) for g in range(grid.shape[1])], rotation=60,
                      ha="right", fontsize=7)
        ax.set_title(f"{self.method} {self.direction} path effects (mean over {self.effect.shape[0]} pair(s))", fontsize=9)
        fig.colorbar(image, ax=ax, label="normalized effect")
        fig.tight_layout()
        fig.savefig(Path(path), dpi=120)
        return Path(path)


def _to_json(item: Node | Receiver) -> dict[str, Any]:
    return {"kind": item.kind, "layer": item.layer, "head": item.head}
