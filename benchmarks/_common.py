"""What the benchmark scripts share: the SAE they measure."""

from __future__ import annotations

from typing import Any

import torch

from patching import Site
from sae import SAEConfig, SparseAutoencoder


def benchmark_sae(model: Any, path: str | None, layer: int, *, topk: int | None = 64) -> SparseAutoencoder:
    """The SAE at `path` (a folder or a shipped release id `RELEASE/SAE_ID`), else a seeded random one
    at `layer` (TopK with `topk`, or ReLU when None).

    Speed figures depend on how many latents are active, not on what they mean, so a random SAE
    is a fair stand-in where no trained one is given.
    """
    if path:
        from latentpatch.cli.common import resolve_sae

        return resolve_sae(path)
    site = Site(layer)
    architecture = {"architecture": "topk", "k": topk} if topk is not None else {}
    cfg = SAEConfig(d_in=site.width(model), d_sae=8 * site.width(model), hook_name=site.hook_name,
                    model_name=model.cfg.model_name, **architecture)
    return SparseAutoencoder(cfg, generator=torch.Generator().manual_seed(0))


def recall_at(estimate: torch.Tensor, exact: torch.Tensor, k: int) -> float:
    """The overlap of the k largest |estimate| and the k largest |exact|, as a fraction of k."""
    top_estimate = set(torch.argsort(estimate.abs(), descending=True, stable=True)[:k].tolist())
    top_exact = set(torch.argsort(exact.abs(), descending=True, stable=True)[:k].tolist())
    return len(top_estimate & top_exact) / k
