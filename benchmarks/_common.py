"""What the benchmark scripts share: the SAE they measure, FLOP counts and the bare-matmul rate."""

from __future__ import annotations

import time
from collections.abc import Callable
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


def count_flops(fn: Callable[[], Any]) -> int:
    """Matrix-multiply FLOPs of one call of `fn` (mm, addmm, bmm, attention), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def matmul_rate(model: Any, rows: int = 1000, repeats: int = 5, clock: Callable[[], float] = time.perf_counter) -> float:
    """FLOP/s of a bare (rows × d_model) @ (d_model × d_mlp) matmul, the model's widest block product
    (best of `repeats` timings of 10 products on `clock`)."""
    width = model.cfg.d_mlp or 4 * model.cfg.d_model
    a, b = torch.randn(rows, model.cfg.d_model), torch.randn(model.cfg.d_model, width)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        for _ in range(10):
            a @ b
        best = min(best, (clock() - start) / 10)
    return 2 * rows * model.cfg.d_model * width / best
