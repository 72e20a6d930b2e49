"""What edge attribution sets each upstream node to, and integrated gradients over each layer's activations.

Interventions (Hanna et al. 2024, "Have Faith in Faithfulness", and their EAP code's `intervention`):
the upstream delta of an edge is `a_u,target − a_u,base`, where the target is the node's output in the
pair's source run (`patch`), zero (`zero`), or its mean over every pair's source run — the corrupted
prompts when noising, Hanna et al.'s reference set — over prompts and positions (`mean`) or per position
(`mean-positional`, prompts of one length). The gradient is always taken at the base run.

EAP-IG over the activations (`ig="activations"`; Hanna et al. §3, Marks et al. 2024 eq. 3): for each
group of upstream nodes that write at one point of the forward pass (the embedding, one layer's heads,
one MLP), the group's outputs are moved along the straight path `base + α · (target − base)` with the
rest of the network recomputed, and the gradient at every receiver is averaged over the `steps` points;
the group's edges use that gradient. One batched forward and backward per group: O(steps × layers),
against O(steps) for the inputs' path (`ig="inputs"`), which moves only the embeddings.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from patching.errors import PatchingError
from patching.model.sites import Site
from patching.paths.nodes import Node
from patching.paths.stream import StreamRun, ablated_outputs

INTERVENTIONS: tuple[str, ...] = ("patch", "zero", "mean", "mean-positional")
_ABLATION = {"patch": "resample", "zero": "zero", "mean": "mean", "mean-positional": "position_mean"}


def check_intervention(intervention: str, lengths: list[int]) -> None:
    """Refuse an unknown intervention, or `mean-positional` over prompts of several lengths."""
    if intervention not in INTERVENTIONS:
        raise PatchingError(f"intervention must be one of {INTERVENTIONS}, got {intervention!r}")
    if intervention == "mean-positional" and len(set(lengths)) > 1:
        raise PatchingError(f"intervention='mean-positional' needs prompts of one token length, got {sorted(set(lengths))}")


def intervened_outputs(model: Any, runs: list[tuple[StreamRun, StreamRun]], pair_index: int, nodes: list[Node],
                       intervention: str) -> dict[Node, Tensor]:
    """Each node's target output in pair `pair_index`, (pos, d_model); `runs` are (base, source) per pair."""
    swapped = [(source, base) for base, source in runs]  # means run over the source runs
    if intervention == "patch":
        return ablated_outputs(model, runs, pair_index, nodes, "resample")
    return ablated_outputs(model, swapped, pair_index, nodes, _ABLATION[intervention])


def writer_groups(senders: list[Node]) -> dict[tuple[str, int], list[int]]:
    """Senders by the point where they write: ("embed", 0), ("attn", layer) or ("mlp", layer)."""
    groups: dict[tuple[str, int], list[int]] = {}
    for s, node in enumerate(senders):
        key = ("embed", 0) if node.kind == "embed" else ("attn" if node.kind == "head" else "mlp", node.layer)
        groups.setdefault(key, []).append(s)
    return groups


def group_hook(key: tuple[str, int], delta: Tensor, alphas: Tensor) -> tuple[str, Any] | None:
    """A hook moving a group's summed output by α · delta, one row per α; None for the embedding (its
    path is the start of the forward pass)."""
    kind, layer = key
    if kind == "embed":
        return None
    name = Site(layer, "attn_out" if kind == "attn" else "mlp_out").hook_name

    def hook(x: Tensor) -> Tensor:  # (rows, pos, d_model)
        return x + (alphas[:, None, None] * delta[None]).to(x.dtype)
    return name, hook
