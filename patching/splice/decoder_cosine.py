"""How much an SAE's decoder rows duplicate one another: each latent's largest cosine with any
other latent's decoder row (SAEBench's `calculate_max_cosine_sim`, evals/core/main.py), computed
in blocks so the d_sae x d_sae matrix never exists at once, and its summary statistics."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from sae.metrics import median

COSINE_QUANTILES = (0.1, 0.25, 0.75, 0.9, 0.99)


@torch.inference_mode()
def max_decoder_cosine(W_dec: Float[Tensor, "d_sae d_in"], *, chunk: int = 4096,
                       absolute: bool = True) -> Float[Tensor, " d_sae"]:
    """For each latent, the largest |cos| between its decoder row and any other latent's row.

    `absolute=False` takes the signed maximum instead, as SAEBench's `calculate_max_cosine_sim`
    does for `average_max_decoder_cosine_sim`; |cos| also counts antiparallel rows as duplicates.
    Computed in blocks of `chunk` rows. A zero row has cosine 0 with everything. With one latent
    there is no other row: NaN.
    """
    rows = W_dec.detach().float()
    unit = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
    for start in range(0, rows.shape[0], chunk):
        block = unit[start:start + chunk] @ unit.T  # (chunk, d_sae)
        block = block.abs() if absolute else block
        index = torch.arange(block.shape[0], device=rows.device)
        block[index, index + start] = float("-inf")  # a row's cosine with itself is not a neighbour
        out[start:start + chunk] = block.max(dim=-1).values
    return out.cpu().masked_fill(torch.isinf(out.cpu()), float("nan"))


def cosine_summary(values: Tensor) -> dict[str, float]:
    """Mean, true median, min, max and `COSINE_QUANTILES` of per-latent max |cos|."""
    values = values.double()
    summary = {"mean": values.mean().item(), "median": median(values).item(),
               "min": values.min().item(), "max": values.max().item()}
    for q in COSINE_QUANTILES:
        summary[f"q{round(q * 100):02d}"] = values.nanquantile(q).item()
    return summary
