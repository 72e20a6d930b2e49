"""One L1 training step of a standard (ReLU) SAE with its gradients written out by hand.

The loss on normalized inputs `x` (batch B), with `c = b_dec` when the SAE subtracts it from
its input and `c = 0` otherwise:

    z     = relu(x @ W_enc + (b_enc - c @ W_enc))           (B, d_sae)
    x_hat = z @ W_dec + b_dec                               (B, d_in)
    n_i   = ||W_dec[i]||
    loss  = (1/B) sum_b ||x_hat_b - x_b||^2  +  lam (1/B) sum_b sum_i z_bi n_i

and its gradients, with g = (2/B)(x_hat - x), s = sum_b z_b and p = dL/d(pre-activations):

    dW_dec = z^T g + (lam/B) s_i W_dec[i] / n_i             db_dec = sum_b g_b  - [W_enc @ sum_b p_b]
    p      = (g @ W_dec^T + (lam/B) n) * [z > 0]
    dW_enc = x^T p  - [c (x) sum_b p_b]                     db_enc = sum_b p_b

(the bracketed terms only when c = b_dec). Autograd computes the same thing, but it allocates
fresh (B, d_sae) tensors every step (the pre-activations, the ReLU output, the gradient of z and
its masked copy), and on a CPU a fresh 75 MB tensor costs its page faults again each time. Here
the two (B, d_sae) tensors and the parameter gradients live in buffers reused from step to step,
the L1 term's gradient is folded into the bias of the `dL/dz` matmul, the ReLU mask is applied in
place, and the firing counts come from a float mask rather than `count_nonzero` (see below).
`tests/test_training_step.py` checks the result against autograd.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sae.model import SparseAutoencoder


class StepForward(NamedTuple):
    """What a step (L1 here, TopK/BatchTopK in `topk_step`) computed on the way, for the loss check,
    metrics and firing statistics. The loss is `mse + penalty`."""

    mse: Tensor
    """Mean over the batch of the summed squared reconstruction error (a 0-d tensor)."""
    l1: Tensor
    """Mean over the batch of the decoder-norm-weighted L1 (a 0-d tensor); a metric only for TopK."""
    penalty: Tensor
    """The loss's second term (0-d), weighted: lambda * l1 for L1, the AuxK loss for TopK/BatchTopK."""
    z: Float[Tensor, "batch d_sae"]
    """Latent activations (a reused buffer: valid until the next step)."""
    x_hat: Float[Tensor, "batch d_in"]
    decoder_norms: Float[Tensor, " d_sae"]
    fired: Int[Tensor, " d_sae"]
    """Per-latent count of the batch's tokens on which it fired (z > 0)."""
    threshold: Tensor | None = None
    """BatchTopK only: the batch's selection threshold (0-d); `z = relu(h) * (h > threshold)`."""


class BufferedStep:
    """Reused (batch, d_sae) buffers and gradient tensors, shared by every hand-written step."""

    def __init__(self, sae: SparseAutoencoder) -> None:
        self.sae = sae
        self._buffers: dict[str, Tensor] = {}

    def _buffer(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self._buffers[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buffer

    def _grad(self, param: Tensor) -> Tensor:
        if param.grad is None or param.grad.shape != param.shape or param.grad.dtype != param.dtype:
            param.grad = torch.empty_like(param)
        return param.grad


class L1Gradients(BufferedStep):
    """Computes the loss of module docstring for one SAE and stores its gradients in `p.grad`.

    The gradient tensors are the same objects every step (written with `out=`), so an optimizer
    over the SAE's parameters must not set them to None between steps.
    """

    def __init__(self, sae: SparseAutoencoder) -> None:
        if sae.cfg.architecture != "standard":
            raise ValueError(f"L1Gradients handles 'standard' (ReLU) SAEs, not {sae.cfg.architecture!r}")
        super().__init__(sae)

    @torch.no_grad()
    def __call__(self, x: Float[Tensor, "batch d_in"], l1_coefficient: float,
                 dead: Tensor | None = None) -> StepForward:
        """The step at `x`; `dead` (the dead-latent mask, read by AuxK) is not used by L1."""
        sae = self.sae
        W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
        batch, d_sae = x.shape[0], sae.cfg.d_sae
        centred = sae.cfg.apply_b_dec_to_input
        # (x - b_dec) @ W_enc as x @ W_enc - b_dec @ W_enc: a vector-matrix product, not a matmul.
        bias = b_enc - b_dec @ W_enc if centred else b_enc
        z = torch.addmm(bias, x, W_enc, out=self._buffer("z", (batch, d_sae), x)).relu_()
        x_hat = torch.addmm(b_dec, z, W_dec)
        norms = W_dec.norm(dim=-1)
        z_sum = z.sum(0)
        residual = x_hat - x
        mse = residual.pow(2).sum(-1).mean()
        l1 = z_sum @ norms / batch
        g = residual.mul_(2.0 / batch)  # dL/dx_hat

        grad_W_dec = torch.mm(z.T, g, out=self._grad(W_dec))
        # d(n_i)/dW_dec[i] = W_dec[i] / n_i, taken as 0 where n_i = 0 (as autograd's norm does).
        norm_scale = (z_sum * (l1_coefficient / batch) / norms).masked_fill_(norms == 0, 0.0)
        grad_W_dec.addcmul_(norm_scale.unsqueeze(-1), W_dec)
        torch.sum(g, 0, out=self._grad(b_dec))

        dz = self._buffer("dz", (batch, d_sae), x)
        # Firing counts through the dz buffer before it is written: a 0/1 float mask summed down the
        # batch costs 8 ms at (4096, 4608) where `count_nonzero(z, dim=0)` costs 60 ms (float sums of
        # 0/1 are exact for batches below 2**24 tokens).
        fired = torch.gt(z, 0, out=dz).sum(0).long()
        torch.addmm(norms * (l1_coefficient / batch), g, W_dec.T, out=dz)
        dpre = torch.ops.aten.threshold_backward.grad_input(dz, z, 0.0, grad_input=dz)  # in place: dz * [z > 0]
        grad_W_enc = torch.mm(x.T, dpre, out=self._grad(W_enc))
        grad_b_enc = torch.sum(dpre, 0, out=self._grad(b_enc))
        if centred:
            grad_W_enc.addr_(b_dec, grad_b_enc, alpha=-1.0)
            b_dec.grad.sub_(W_enc @ grad_b_enc)
        return StepForward(mse=mse, l1=l1, penalty=l1 * l1_coefficient, z=z, x_hat=x_hat, decoder_norms=norms,
                           fired=fired)

    def after_step_(self, step: int) -> None:
        """Nothing to do after the optimizer step (TopK renormalises its decoder here)."""
