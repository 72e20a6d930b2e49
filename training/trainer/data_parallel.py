"""Data-parallel training: the single-process trainer on every rank, gradients all-reduced.

Each rank reads its own stripe of the activation stream (`batch_size / world_size` rows per
step, e.g. `RowStripe`, a striped `TokenRows` or a striped cache). The hand-written step
(training/step.py) never calls `backward()`, so there are no autograd hooks for DDP to ride on;
instead each SAE's gradients live in one flat buffer (`p.grad` are views into it, DDP's
`gradient_as_bucket_view`), and one `all_reduce` per SAE per step sums that buffer, the firing
counts and the loss terms. Every loss is a mean over equally many rows per rank, so the average
of the ranks' gradients is the gradient of the global batch: a run on N ranks with global batch
B takes the steps of a single process with batch B on the concatenated rows (to float-reduction
order). Everything else that decides something agrees on every rank:
- the normalisation scale and `b_dec` come from the gathered initialisation batches, and rank
  0's initial parameters are broadcast;
- firing counts are summed, so dead-latent masks and resampling decisions agree; resampling
  draws from the gathered batch and rank 0's result is broadcast;
- a non-finite input on any rank, or Ctrl-C on any rank, is agreed by a 2-flag all-reduce at the
  start of each step, so every rank raises (or stops) at the same step;
- rank 0 writes checkpoints (holding every rank's data position and RNGs, gathered as bytes),
  logs, wandb and the final SAE folders; on resume rank 0 reads the checkpoint and sends each
  rank its state, so only rank 0 needs to see the output folder.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae.metrics import explained_variance_from_sums
from sae.model import SparseAutoencoder
from training.trainer import checkpoint as ckpt
from training.trainer.config import TrainerConfig
from training.parallel.distributed import Collective, state_from_bytes, state_to_bytes
from training.errors import CheckpointError, NonFiniteError, TrainingConfigError
from training.trainer.runlog import RunLog
from training.trainer.step import StepForward
from training.trainer.topk_step import TopKGradients
from training.trainer.trainer import Trainer, _Member


class DataParallelTrainer(Trainer):
    """`Trainer` for one rank of a data-parallel job; `batches` yields this rank's rows only."""

    def __init__(self, config: TrainerConfig, saes: SparseAutoencoder | Sequence[SparseAutoencoder],
                 batches: Iterator[Tensor], *, collective: Collective, out_dir: str | Path | None = None,
                 model: Any = None, eval_tokens: Any = None, wandb_project: str | None = None) -> None:
        super().__init__(config, saes, batches, out_dir=out_dir, model=model, eval_tokens=eval_tokens,
                         wandb_project=wandb_project if collective.is_main else None)
        self.comm = collective
        self.rank, self.world_size = collective.rank, collective.world_size
        # The stripe (and so the run) depends on the world size: resuming on another is refused.
        self.fingerprint = config.fingerprint(self.fingerprint, {"data_parallel_world_size": self.world_size})
        collective.check_same(self.fingerprint, "the trainer fingerprint (trainer config, SAE configs, data)")
        self._flat = {id(m): _bind_flat_gradients(m) for m in self.members}
        for member in self.members:
            if isinstance(member.gradients, TopKGradients):  # BatchTopK selects over the global batch
                member.gradients.world_size, member.gradients.gather = self.world_size, collective.all_gather_rows
        self._stop_agreed = False

    # ----------------------------------------------------------------------------- seams of Trainer
    def _runlog(self) -> RunLog:
        if self.comm.is_main:
            return super()._runlog()
        return RunLog(None, total_steps=self.config.total_steps, start_step=self.step, progress_bar=False)

    def _init_rows(self, batches: list[Tensor]) -> Tensor:
        # Batch by batch, so the rows stand in the order of the single-process run's batches.
        return torch.cat([self.comm.all_gather_rows(batch) for batch in batches])

    @torch.no_grad()
    def _after_initialise(self) -> None:
        for member in self.members:
            for param in member.sae.parameters():
                self.comm.broadcast_(param.detach())
        scale = self.comm.broadcast_(torch.tensor([self.scale], dtype=torch.float64))
        self.scale = float(scale[0])
        for member in self.members:
            self._set_scale(member.sae)

    def _check_input(self, x: Tensor, step: int) -> None:
        flags = torch.tensor([float(not torch.isfinite(x).all()), float(self._interrupt_requested)],
                             dtype=torch.float64)
        self.comm.all_reduce_sum_(flags)
        self._stop_agreed = bool(flags[1] > 0)
        if flags[0] > 0:
            raise NonFiniteError(step, "activations (input batch)")

    def _stop_requested(self) -> bool:
        return self._stop_agreed

    @torch.no_grad()
    def _reduce_gradients(self, member: _Member, out: StepForward) -> StepForward:
        flat = self._flat[id(member)]
        tail = flat[flat.numel() - member.sae.cfg.d_sae - 3 :]  # (d_sae fired counts, mse, l1, penalty)
        tail[:-3].copy_(out.fired)
        tail[-3], tail[-2], tail[-1] = out.mse, out.l1, out.penalty
        self.comm.all_reduce_sum_(flat)
        flat[: flat.numel() - tail.numel()].div_(self.world_size)  # the gradients: a mean, as DDP's
        tail[-3:].div_(self.world_size)
        # Float sums of counts are exact below 2**24 tokens per global batch.
        return out._replace(mse=tail[-3].clone(), l1=tail[-2].clone(), penalty=tail[-1].clone(),
                            fired=tail[:-3].round().long())

    @torch.no_grad()
    def _batch_metrics(self, x_n: Tensor, out: StepForward) -> dict[str, float]:
        """`batch_metrics` over the global batch, from sums every rank contributes to."""
        x, residual = x_n.double(), (x_n - out.x_hat).double()
        sums = torch.cat([torch.stack([residual.pow(2).sum(), x.pow(2).sum(), (out.z != 0).double().sum(),
                                       (out.z.double() @ out.decoder_norms.double()).sum()]), x.sum(0)]).cpu()
        self.comm.all_reduce_sum_(sums)
        n, d_in = x_n.shape[0] * self.world_size, x_n.shape[1]
        squared, x_squared, nonzero, l1 = sums[:4].tolist()
        # The same definitions as training.trainer.metrics.batch_metrics (mse in the activations' units).
        return {"mse": squared / (n * d_in) * self.scale**2,
                "explained_variance": explained_variance_from_sums(squared, x_squared, sums[4:], n), "l0": nonzero / n,
                "l1": l1 / n}

    @torch.no_grad()
    def _resample(self, member: _Member, x_n: Tensor) -> int:
        count = super()._resample(member, self.comm.all_gather_rows(x_n))
        if count:  # the same on every rank: the firing counts were summed
            state = member.optimizer.state
            for param in member.sae.parameters():
                self.comm.broadcast_(param.detach())
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state.get(param, {}):
                        self.comm.broadcast_(state[param][key])
        return count

    def _evaluate(self, runlog: RunLog) -> None:
        if self.comm.is_main:
            super()._evaluate(runlog)

    # ----------------------------------------------------------------------------- state
    def _checkpoint_when_exhausted(self) -> Path | None:
        return None  # one rank's source ending is not a moment the others share: no collective here

    def _checkpoint(self) -> Path | None:
        if self.checkpoint_root is None or self.step == 0:
            return None
        state = self.state_dict()
        folder = self.checkpoint_root / f"step-{self.step:08d}"
        if state is not None:
            folder = ckpt.write_checkpoint(self.checkpoint_root, self.step, state, fingerprint=self.fingerprint,
                                           keep=self.config.keep_checkpoints)
        self.comm.barrier()  # every rank returns once the checkpoint is on disk
        return folder

    def state_dict(self) -> dict[str, Any] | None:
        """The trainer state with every rank's data position and RNGs (`ranks`), on rank 0; None elsewhere.

        Called on every rank at once (it gathers).
        """
        state = super().state_dict()
        own = {"data": state.pop("data"), "rng": state.pop("rng")}
        parts = self.comm.gather_bytes(state_to_bytes(own))
        if parts is None:
            return None
        ranks = [state_from_bytes(part) for part in parts]
        return {**state, "data": None, "rng": ranks[0]["rng"], "ranks": ranks}

    def resume(self, checkpoint: str | Path | None = None) -> int:
        """Rank 0 reads the checkpoint and sends every rank its state; every rank raises if it cannot."""
        state, problem, error = None, b"", None
        if self.comm.is_main:
            try:
                root = self.checkpoint_root or ""
                folder = Path(checkpoint) if checkpoint is not None else ckpt.latest_checkpoint(root)
                if folder is None:
                    raise TrainingConfigError(f"no complete checkpoint under {root}; start without resume")
                _, state = ckpt.load_checkpoint(folder, fingerprint=self.fingerprint)
            except (CheckpointError, TrainingConfigError) as err:
                problem, error = str(err).encode(), err
        problem = self.comm.broadcast_bytes(problem)
        if problem:
            if error is not None:
                raise error
            raise TrainingConfigError(f"rank 0 could not resume: {problem.decode()}")
        parts = [state_to_bytes(part) for part in state.pop("ranks")] if state is not None else None
        own = state_from_bytes(self.comm.scatter_bytes(parts))
        shared = state_from_bytes(self.comm.broadcast_bytes(state_to_bytes(state) if state is not None else None))
        self.load_state_dict({**shared, **own})
        return self.step

    def save(self, out_dir: str | Path) -> list[Path]:
        return super().save(out_dir) if self.comm.is_main else []


def _bind_flat_gradients(member: _Member) -> Tensor:
    """One buffer per SAE: its gradients (as the views `p.grad`), then d_sae firing counts, mse, l1, penalty.

    The hand-written steps write gradients into existing `p.grad` tensors of the right shape, so after
    this every step writes straight into the buffer that is all-reduced: no copies.
    """
    params = list(member.sae.parameters())
    n_grad = sum(p.numel() for p in params)
    flat = torch.zeros(n_grad + member.sae.cfg.d_sae + 3, dtype=params[0].dtype, device=params[0].device)
    offset = 0
    for param in params:
        param.grad = flat[offset : offset + param.numel()].view_as(param)
        offset += param.numel()
    return flat
