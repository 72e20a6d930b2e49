"""Data-dependent initialisation: the input normalization scale and `b_dec`.

The scale makes E||x / s|| = sqrt(d_in) (SAELens's `expected_average_only_in`), so one L1
coefficient means the same at every layer and model. `b_dec` starts at the geometric median
of the inputs (Towards Monosemanticity): the point minimising the summed distances, a robust
centre that ignores the few huge-norm tokens a mean would chase. Computed with Weiszfeld's
algorithm (Weiszfeld 1937; the epsilon-guarded form of Vardi & Zhang 2000).
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor


@torch.no_grad()
def normalization_scale(x: Float[Tensor, "token d_in"]) -> float:
    """s with mean ||x / s|| = sqrt(d_in)."""
    return (x.norm(dim=-1).mean() / math.sqrt(x.shape[-1])).item()


@torch.no_grad()
def geometric_median(x: Float[Tensor, "token d_in"], *, max_iter: int = 100, tol: float = 1e-6,
                     eps: float = 1e-8) -> Float[Tensor, " d_in"]:
    """argmin_m sum_t ||x_t - m|| by Weiszfeld iteration, started at the mean."""
    x = x.double()
    median = x.mean(0)
    for _ in range(max_iter):
        weights = 1.0 / (x - median).norm(dim=-1).clamp_min(eps)
        updated = (weights[:, None] * x).sum(0) / weights.sum()
        moved = (updated - median).norm() / median.norm().clamp_min(eps)
        median = updated
        if moved < tol:
            break
    return median.float()
