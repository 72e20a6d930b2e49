"""Nested training state (tensors inside dicts and lists) as named tensors plus a JSON tree.

Checkpoints (`training.trainer.checkpoint`) and the collectives of a distributed job
(`training.parallel.distributed`) both store state this way, so that nothing is ever pickled
(RELIABILITY.md R1); it sits below both rooms.
"""

from __future__ import annotations

from typing import Any

import torch

from training.errors import CheckpointError

_TENSOR_KEY = "__tensor__"


def flatten_state(state: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split nested state into named tensors and a JSON tree that refers to them by name."""
    if isinstance(state, torch.Tensor):
        return {prefix: state.detach().cpu().contiguous().clone()}, {_TENSOR_KEY: prefix}
    if isinstance(state, dict):
        tensors: dict[str, torch.Tensor] = {}
        tree = {}
        for key, value in state.items():
            if not isinstance(key, str) or "/" in key:
                raise CheckpointError(prefix or ".", f"state key {key!r} must be a string without '/'")
            sub_tensors, tree[key] = flatten_state(value, f"{prefix}/{key}" if prefix else key)
            tensors.update(sub_tensors)
        return tensors, tree
    if isinstance(state, (list, tuple)):
        tensors, tree = {}, []
        for index, value in enumerate(state):
            sub_tensors, sub_tree = flatten_state(value, f"{prefix}/{index}")
            tensors.update(sub_tensors)
            tree.append(sub_tree)
        return tensors, tree
    if state is None or isinstance(state, (bool, int, float, str)):
        return {}, state
    raise CheckpointError(prefix or ".", f"cannot store a {type(state).__name__} in a checkpoint")


def unflatten_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR_KEY}:
            return tensors[tree[_TENSOR_KEY]]
        return {key: unflatten_state(value, tensors) for key, value in tree.items()}
    if isinstance(tree, list):
        return [unflatten_state(value, tensors) for value in tree]
    return tree
