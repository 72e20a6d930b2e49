"""One TopK or BatchTopK training step with the AuxK loss, its gradients written out by hand.

TopK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", §2.3) keeps each token's k
largest pre-activations; BatchTopK (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders") keeps
the k*B largest of the whole batch, so tokens share a budget of k per token on average. With
normalized inputs `x` (batch B), `c` = `b_dec` or 0 as in step.py, and
`h = x @ W_enc + (b_enc - c @ W_enc)`:

    z     = relu(h) on the selected entries, 0 elsewhere            (B, d_sae)
    x_hat = z @ W_dec + b_dec
    loss  = (1/B) sum_b ||x_hat_b - x_b||^2  +  alpha s (1/B) sum_b ||e_hat_b - e_b||^2

The second term is AuxK (Gao et al. appendix A.2): `e = x - x_hat` held constant (no gradient
reaches the main reconstruction through it), `e_hat = z_aux @ W_dec` with `z_aux` the relu'd
top-`k_aux` pre-activations among the dead latents only, so dead latents learn what the live
ones miss; `s = min(n_dead / k_aux, 1)` shrinks it when few are dead. `k_aux` defaults to
`d_in / 2` (SAELens `calculate_topk_aux_loss`, whose form this is; the relu on `z_aux` follows
EleutherAI's sparsify). With `g = (2/B)(x_hat - x)` and `g_a = alpha s (2/B)(e_hat - e)`:

    p      = (g @ W_dec^T) * [z > 0]  +  into_dead((g_a @ W_dead^T) * [z_aux > 0])
    dW_dec = z^T g + into_dead(z_aux^T g_a)        db_dec = sum_b g_b - [W_enc @ sum_b p_b]
    dW_enc = x^T p - [c (x) sum_b p_b]             db_enc = sum_b p_b

The selection is piecewise constant and has no gradient, as autograd through `torch.topk`. Only
the selected entries of `z` and `p` are nonzero, so `z @ W_dec`, `z^T g` and `x^T p` are sparse
products (B*k*d_in work); the step's two dense matmuls are `h` and `g @ W_dec^T` (read at the
selected entries), against the L1 step's five.
Decoder rows stay at unit norm (Gao et al. §2.1): the selection compares pre-activations, which a
latent could otherwise win by shrinking its decoder row while growing its encoder column. The
gradient's component along each row is removed before the optimizer step and the rows are
renormalised after it (`after_step_`), as openai/sparse_autoencoder's `unit_norm_decoder_`.

BatchTopK selects `relu(h) > theta`, theta halfway between the (kB)-th and (kB+1)-th largest
entry of `relu(h)` in the batch: the batch's top kB (up to exact ties), and exactly what the
JumpReLU with that threshold (the form SAELens saves a BatchTopK SAE in) computes on that batch.
The inference threshold is a running mean of the batches' thetas, an EMA once `1/step` falls
below `threshold_lr` (Bussmann et al. §3.2 average the smallest selected activation; SAELens keeps
an EMA of it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from sae.model import SparseAutoencoder
from training.trainer.step import BufferedStep, StepForward


class TopKGradients(BufferedStep):
    """The loss of the module docstring for one SAE, its gradients stored in `p.grad`.

    `batch_level=False` trains a `topk` SAE (`sae.cfg.k` must equal `k`); `batch_level=True` trains
    a `jumprelu` SAE whose `threshold` the step keeps at the running BatchTopK threshold.
    """

    def __init__(self, sae: SparseAutoencoder, *, k: int, batch_level: bool, auxk_coefficient: float,
                 k_aux: int | None = None, threshold_lr: float = 0.01, unit_norm_decoder: bool = True) -> None:
        expected = "jumprelu" if batch_level else "topk"
        if sae.cfg.architecture != expected:
            raise ValueError(f"{'BatchTopK' if batch_level else 'TopK'} trains {expected!r} SAEs, "
                             f"not {sae.cfg.architecture!r}")
        if not batch_level and sae.cfg.k != k:
            raise ValueError(f"the SAE's cfg.k={sae.cfg.k} differs from the trainer's k={k}")
        super().__init__(sae)
        self.k, self.batch_level, self.auxk_coefficient = k, batch_level, auxk_coefficient
        self.k_aux = max(1, sae.cfg.d_in // 2) if k_aux is None else k_aux
        self.threshold_lr, self.unit_norm_decoder = threshold_lr, unit_norm_decoder
        self.world_size = 1
        """Data parallel: ranks whose rows make up the global batch (BatchTopK's kB counts them all)."""
        self.gather: Callable[[Tensor], Tensor] | None = None
        """Data parallel: every rank's candidate values concatenated (`Collective.all_gather_rows`)."""
        self._batch_threshold: Tensor | None = None

    @torch.no_grad()
    def __call__(self, x: Float[Tensor, "batch d_in"], l1_coefficient: float = 0.0,
                 dead: Bool[Tensor, " d_sae"] | None = None) -> StepForward:
        """The step at `x`; `dead` is the dead-latent mask AuxK trains (None: no AuxK term).
        `l1_coefficient` is not used: the sparsity is the selection's."""
        sae = self.sae
        W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
        batch, d_sae = x.shape[0], sae.cfg.d_sae
        centred = sae.cfg.apply_b_dec_to_input
        bias = b_enc - b_dec @ W_enc if centred else b_enc
        h = torch.addmm(bias, x, W_enc, out=self._buffer("h", (batch, d_sae), x))
        active, values, threshold = self._select(h)  # flat indices into (B, d_sae) and relu(h) there
        rows, cols = active // d_sae, active % d_sae
        z = self._buffer("z", (batch, d_sae), x).zero_()
        z.view(-1).index_copy_(0, active, values)
        Z = _sparse(rows, cols, values, batch, d_sae)
        x_hat = torch.sparse.addmm(b_dec.expand(batch, -1), Z, W_dec)  # only the selected rows of W_dec
        norms = W_dec.norm(dim=-1)
        residual = x_hat - x  # (B, d_in), kept: AuxK's e is -residual
        mse = residual.pow(2).sum(-1).mean()
        l1 = values @ norms[cols] / batch
        g = residual * (2.0 / batch)
        self._grad(W_dec).copy_(torch.sparse.mm(Z.t(), g))
        torch.sum(g, 0, out=self._grad(b_dec))
        # dL/dh where z > 0 (elsewhere it is 0): one dense matmul, read at the selected entries.
        dz = torch.mm(g, W_dec.T, out=self._buffer("dz", (batch, d_sae), x))
        firing = values > 0
        p = dz.view(-1)[active] * firing
        fired = torch.bincount(cols[firing], minlength=d_sae)
        penalty, aux = self._auxk_(h, residual, dead)
        if aux is not None:
            rows, cols, p = torch.cat([rows, aux[0]]), torch.cat([cols, aux[1]]), torch.cat([p, aux[2]])
        grad_W_enc = self._grad(W_enc)
        grad_W_enc.copy_(torch.sparse.mm(_sparse(cols, rows, p, d_sae, batch), x).T)  # x^T p, as (d_sae, d_in)^T
        grad_b_enc = self._grad(b_enc).zero_().index_add_(0, cols, p)
        if centred:
            grad_W_enc.addr_(b_dec, grad_b_enc, alpha=-1.0)
            b_dec.grad.sub_(W_enc @ grad_b_enc)
        if self.unit_norm_decoder:
            # Tangent to the unit sphere of each row: remove the component along W_dec[i].
            along = (W_dec.grad * W_dec).sum(-1, keepdim=True) / norms.pow(2).clamp_min(1e-24).unsqueeze(-1)
            W_dec.grad.sub_(along * W_dec)
        self._batch_threshold = threshold
        return StepForward(mse=mse, l1=l1, penalty=penalty, z=z, x_hat=x_hat, decoder_norms=norms, fired=fired,
                           threshold=threshold)

    def _select(self, h: Float[Tensor, "batch d_sae"]) -> tuple[Tensor, Tensor, Tensor | None]:
        """The selected entries (flat indices into h, their relu'd values) and BatchTopK's threshold."""
        batch, d_sae = h.shape
        if not self.batch_level:
            top = torch.topk(h, self.k, dim=-1, sorted=False)
            active = (top.indices + torch.arange(batch, device=h.device).unsqueeze(-1) * d_sae).flatten()
            return active, top.values.relu().flatten(), None
        relu = torch.clamp(h, min=0.0, out=self._buffer("z", tuple(h.shape), h))
        n_keep = self.k * batch * self.world_size
        values, indices = self._candidates(relu, n_keep)
        candidates = values if self.gather is None else self.gather(values)
        # The global batch's top n_keep + 1 lie among every rank's own top n_keep + 1.
        ordered = candidates.topk(n_keep + 1).values  # descending
        threshold = (ordered[n_keep - 1] + ordered[n_keep]) / 2
        keep = values > threshold  # = relu(h) > threshold: every such entry is a local candidate
        return indices[keep], values[keep], threshold

    def _candidates(self, relu: Tensor, n_keep: int) -> tuple[Tensor, Tensor]:
        """The min(n_keep + 1, B*d_sae) largest entries of `relu` (values, flat indices), ties aside.

        One process: first each row's top m = 4k (a row-wise top-k costs a quarter of one over the
        flattened batch on a CPU); their union's top n_keep + 1 is the answer whenever no row's m-th
        largest exceeds that set's smallest, since everything left out is then no larger. Otherwise,
        and under data parallel (where the ranks would have to agree on the fallback), the flat top.
        """
        batch, d_sae = relu.shape
        m = min(d_sae, 4 * self.k)
        if self.gather is None and m < d_sae:
            rows = relu.topk(m, dim=-1, sorted=False)  # (B, m); m > k, so B*m > n_keep
            pool = rows.values.flatten().topk(n_keep + 1, sorted=False)
            if rows.values.min(-1).values.max() <= pool.values.min():
                offsets = torch.arange(batch, device=relu.device).unsqueeze(-1) * d_sae
                return pool.values, (rows.indices + offsets).flatten()[pool.indices]
        top = relu.view(-1).topk(min(n_keep + 1, relu.numel()), sorted=False)
        return top.values, top.indices

    def _auxk_(self, h: Tensor, residual: Tensor, dead: Tensor | None) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        """AuxK's weighted loss (0-d); adds its gradient to `W_dec.grad` and returns its dL/dh entries
        (rows, columns, values), or None without dead latents."""
        index = dead.nonzero().squeeze(-1) if dead is not None and self.auxk_coefficient > 0 else None
        if index is None or index.numel() == 0:
            return residual.new_zeros(()), None
        n_dead, (batch, d_sae), W_dec = index.numel(), h.shape, self.sae.W_dec
        k_aux = min(self.k_aux, n_dead)
        weight = self.auxk_coefficient * min(n_dead / self.k_aux, 1.0)
        h_dead = h.index_select(1, index).relu_()  # (B, n_dead)
        top = h_dead.topk(k_aux, dim=-1, sorted=False)
        rows = torch.arange(batch, device=h.device).repeat_interleave(k_aux)
        cols, values = index[top.indices].flatten(), top.values.flatten()
        Z_aux = _sparse(rows, cols, values, batch, d_sae)
        miss = torch.sparse.addmm(residual, Z_aux, W_dec)  # e_hat - e = z_aux @ W_dec + (x_hat - x)
        aux = miss.pow(2).sum(-1).mean()
        g_aux = miss.mul_(weight * 2.0 / batch)
        W_dec.grad.add_(torch.sparse.mm(Z_aux.t(), g_aux))
        dz_aux = g_aux @ W_dec.index_select(0, index).T  # (B, n_dead)
        p = dz_aux.gather(1, top.indices).flatten() * (values > 0)
        return aux * weight, (rows, cols, p)

    @torch.no_grad()
    def after_step_(self, step: int) -> None:
        """After the optimizer's step `step` (1-based): unit decoder rows, and BatchTopK's running
        threshold (a mean of the first 1/threshold_lr batches' thresholds, then an EMA)."""
        sae = self.sae
        if self.unit_norm_decoder:
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        if self.batch_level and self._batch_threshold is not None:
            rate = max(self.threshold_lr, 1.0 / step)
            sae.threshold.add_(rate * (self._batch_threshold.to(sae.threshold.dtype) - sae.threshold))


def _sparse(rows: Tensor, cols: Tensor, values: Tensor, n_rows: int, n_cols: int) -> Tensor:
    """A (n_rows, n_cols) COO matrix; repeated (row, col) pairs add up, as in `torch.sparse.mm`."""
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (n_rows, n_cols), check_invariants=False)
