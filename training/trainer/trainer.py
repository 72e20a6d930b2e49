"""Trainer: one or several SAEs (L1 by default; TopK or BatchTopK with AuxK) trained on one stream
of activation batches.

`Trainer(config, saes, batches).fit()` is a loop of small named steps (STYLE.md rule 11):
`_initialise` (scale and `b_dec` from data), `_step` -> `StepOutput` (one Adam step of every
SAE on the same batch), `_log`, `_evaluate`, `_checkpoint`. Several SAEs (an L1 sweep, several
widths) share each batch, so the data is read or harvested once for all of them.

Reliability (RELIABILITY.md R8-R11): checkpoints hold every piece of state, resume is exact on
CPU, a non-finite value stops training before any parameter changes, and Ctrl-C or SIGTERM finishes
the running step, writes a checkpoint and raises `TrainingInterrupted` with signal handlers restored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sae.model import SparseAutoencoder
from training.trainer import checkpoint as ckpt
from training.trainer.config import TrainerConfig
from training.errors import DataSourceError, NonFiniteError, TrainingConfigError, TrainingInterrupted
from training.trainer.init import geometric_median, normalization_scale
from training.trainer.metrics import FiringTracker, batch_metrics
from training.trainer.resample import resample_dead_
from training.trainer.runlog import RunLog
from training.trainer.objective import cfg_identity, check_sae_for, check_saes, make_gradients, trained_parameters
from training.trainer.step import L1Gradients, StepForward
from training.trainer.topk_step import TopKGradients
from training.activations.sources import StatefulSource, skip_batches

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


class StepOutput(NamedTuple):
    """What one training step did."""

    step: int
    """The step just taken (1-based)."""
    lr: float
    """Learning rate used."""
    l1_scale: float
    """Warmup multiplier of every L1 coefficient."""
    losses: tuple[float, ...] | None
    """Each SAE's total loss, on log steps only (reading it forces a sync)."""
    metrics: tuple[dict[str, float], ...] | None
    """Each SAE's batch metrics (MSE, EV, L0, L1), on log steps only."""
    resampled: tuple[int, ...]
    """Latents resampled per SAE at this step (zeros on other steps)."""


@dataclass
class _Member:
    """One SAE being trained and everything that belongs to it alone."""

    sae: SparseAutoencoder
    optimizer: torch.optim.Adam
    l1_coefficient: float
    firing: FiringTracker
    gradients: L1Gradients | TopKGradients


class Trainer:
    """Trains SAEs on `batches`, any iterator of `(batch, d_in)` float tensors.

    `out_dir` (optional) receives the JSONL log, checkpoints under `checkpoints/` and, at the
    end, the SAE folder (several SAEs: `sae-0/`, `sae-1/`, ...). With `model` and `eval_tokens`,
    the evaluator (`patching.splice.evaluate_sae`) runs every `config.eval_every` steps at each SAE's
    `cfg.hook_name`.
    """

    def __init__(self, config: TrainerConfig, saes: SparseAutoencoder | Sequence[SparseAutoencoder],
                 batches: Iterator[Tensor], *, out_dir: str | Path | None = None, model: Any = None,
                 eval_tokens: Int[Tensor, "batch pos"] | None = None, wandb_project: str | None = None) -> None:
        self.config = config
        self.single = isinstance(saes, SparseAutoencoder)
        sae_list = [saes] if self.single else list(saes)
        check_saes(sae_list)
        for index, (sae, k) in enumerate(zip(sae_list, config.k_for(len(sae_list)))):
            check_sae_for(config, sae, index, k)
        if (model is None) != (eval_tokens is None) or (config.eval_every is not None and model is None):
            raise TrainingConfigError("evaluation needs both model and eval_tokens (and config.eval_every); "
                                      f"got model={'set' if model is not None else None}, eval_tokens="
                                      f"{'set' if eval_tokens is not None else None}, eval_every={config.eval_every}")
        if model is not None and any(s.cfg.hook_name is None for s in sae_list):
            raise TrainingConfigError("evaluating with a model needs every SAE's cfg.hook_name")
        self.batches = batches
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.model, self.eval_tokens, self.wandb_project = model, eval_tokens, wandb_project
        betas = config.adam_betas
        # fused Adam: one kernel per parameter instead of a dozen elementwise passes.
        self.members = [_Member(sae, torch.optim.Adam(trained_parameters(sae), lr=config.lr, betas=betas, fused=True),
                                coefficient, FiringTracker(sae.cfg.d_sae), make_gradients(config, sae, k))
                        for sae, coefficient, k in zip(sae_list, config.l1_for(len(sae_list)),
                                                       config.k_for(len(sae_list)))]
        self.fingerprint = config.fingerprint(
            [cfg_identity(s) for s in sae_list],
            batches.describe() if hasattr(batches, "describe") else type(batches).__name__)
        self.step, self.tokens_seen, self.batches_consumed = 0, 0, 0
        self.scale: float | None = None
        self.generator = torch.Generator().manual_seed(config.seed)
        self.history: list[dict[str, Any]] = []
        self._interrupt_requested = False
        # Data-parallel training (training/data_parallel.py) runs this loop on every rank; a plain
        # Trainer is rank 0 of 1, and the seams below (`_reduce_gradients`, ...) do nothing.
        self.rank, self.world_size = 0, 1

    @property
    def saes(self) -> list[SparseAutoencoder]:
        return [m.sae for m in self.members]

    @property
    def checkpoint_root(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / CHECKPOINT_DIR

    # ----------------------------------------------------------------------------- the loop
    def fit(self, *, until_step: int | None = None) -> SparseAutoencoder | list[SparseAutoencoder]:
        """Train to `config.total_steps` (or stop after `until_step`, checkpointed) and return the SAE(s)."""
        stop = self.config.total_steps if until_step is None else min(until_step, self.config.total_steps)
        runlog = self._runlog()
        self.history = runlog.history
        try:
            with self._sigint_deferred():
                if self.step == 0 and self.scale is None:
                    ckpt.seed_everything(self.config.seed + self.rank)
                    self._initialise()
                while self.step < stop:
                    output = self._step(self._next_batch())
                    runlog.advance()
                    self._after_step(output, runlog)
            self._checkpoint()
        finally:
            runlog.close()
        if self.step == self.config.total_steps and self.out_dir is not None:
            self.save(self.out_dir)
        return self.saes[0] if self.single else self.saes

    def _runlog(self) -> RunLog:
        return RunLog(self.out_dir, total_steps=self.config.total_steps, start_step=self.step,
                      progress_bar=self.config.progress_bar, wandb_project=self.wandb_project,
                      run_config=self.config.to_dict())

    def _after_step(self, output: StepOutput, runlog: RunLog) -> None:
        cfg = self.config
        if output.metrics is not None:
            self._log(output, runlog)
        if any(output.resampled):
            runlog.write({"step": self.step, "tokens": self.tokens_seen, "resampled": list(output.resampled)})
        if cfg.eval_every is not None and (self.step % cfg.eval_every == 0 or self.step == cfg.total_steps):
            self._evaluate(runlog)
        if self._stop_requested():
            raise TrainingInterrupted(self.step, self._checkpoint())
        if cfg.checkpoint_every is not None and self.step % cfg.checkpoint_every == 0:
            self._checkpoint()

    def _next_batch(self) -> Tensor:
        try:
            batch = next(self.batches)
        except StopIteration as err:
            checkpoint = self._checkpoint_when_exhausted()
            saved = f"; checkpoint {checkpoint} holds the run so far" if checkpoint is not None else ""
            raise DataSourceError(f"the batch iterator ended after {self.batches_consumed} batches, before step "
                                  f"{self.config.total_steps}{saved}") from err
        self.batches_consumed += 1
        d_in = self.members[0].sae.cfg.d_in
        if batch.ndim != 2 or batch.shape[1] != d_in:
            raise DataSourceError(f"batch {self.batches_consumed} has shape {tuple(batch.shape)}, expected (batch, {d_in})")
        return batch.to(self.members[0].sae.W_enc.dtype)

    # ----------------------------------------------------------------------------- init
    @torch.no_grad()
    def _initialise(self) -> None:
        """Estimate the scale and b_dec from `init_batches` batches (not trained on); set decoder norms."""
        x = self._init_rows([self._next_batch() for _ in range(self.config.init_batches)])  # (token, d_in)
        if not torch.isfinite(x).all():
            raise NonFiniteError(0, "activations (initialisation batches)")
        self.scale = normalization_scale(x) if self.config.normalization == "expected_norm" else 1.0
        x = x / self.scale
        b_dec = {"geometric_median": geometric_median, "mean": lambda t: t.mean(0),
                 "zeros": lambda t: torch.zeros(t.shape[1], dtype=t.dtype)}[self.config.b_dec_init](x)
        for member in self.members:
            sae = member.sae
            sae.b_dec.copy_(b_dec)
            # TopK and BatchTopK keep unit decoder rows (training/trainer/topk_step.py).
            norm = self.config.decoder_init_norm if self.config.architecture == "l1" else 1.0
            if norm is not None:
                sae.W_dec.mul_(norm / sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
                sae.W_enc.copy_(sae.W_dec.T)
            self._set_scale(sae)
        self._after_initialise()
        log.info("normalization scale %.6g, b_dec init %s (norm %.4g)", self.scale, self.config.b_dec_init,
                 self.members[0].sae.b_dec.norm().item())

    def _init_rows(self, batches: list[Tensor]) -> Tensor:
        return torch.cat(batches)

    def _after_initialise(self) -> None:
        """Data parallel: every rank takes rank 0's initial parameters and scale."""

    def _set_scale(self, sae: SparseAutoencoder) -> None:
        # Only `expected_norm` runs carry a scale: it is folded into the weights at save.
        scale = self.scale if self.config.normalization == "expected_norm" else None
        sae.cfg = dataclasses.replace(sae.cfg, normalization_scale=scale)

    # ----------------------------------------------------------------------------- one step
    def _step(self, x: Float[Tensor, "batch d_in"]) -> StepOutput:
        cfg, step = self.config, self.step + 1
        self._check_input(x, step)
        lr, l1_scale = cfg.lr_at(step), cfg.l1_scale_at(step)
        is_log = step % cfg.log_every == 0 or step == cfg.total_steps
        x_n = x / self.scale  # (batch, d_in), normalized units: the loss is measured here
        # Every SAE's loss and gradients are checked before any optimizer steps (R10): a non-finite
        # value in SAE 1 must leave SAE 0 untouched too, as the error message promises.
        grads = [self._sae_gradients(i, m, x_n, l1_scale, step) for i, m in enumerate(self.members)]
        results = [self._sae_update(m, out, loss, x_n, lr, is_log, step) for m, (out, loss) in zip(self.members, grads)]
        resampled = tuple(self._resample(m, x_n) if step in cfg.resample_steps else 0 for m in self.members)
        self.step, self.tokens_seen = step, self.tokens_seen + x.shape[0] * self.world_size
        return StepOutput(step=step, lr=lr, l1_scale=l1_scale,
                          losses=tuple(r[0] for r in results) if is_log else None,
                          metrics=tuple(r[1] for r in results) if is_log else None, resampled=resampled)

    def _sae_gradients(self, index: int, member: _Member, x_n: Tensor, l1_scale: float, step: int) -> tuple[Any, Tensor]:
        # Loss and gradients written out (training/step.py), into this SAE's buffers, reused every step.
        coefficient = member.l1_coefficient * l1_scale
        dead = member.firing.dead_mask(self.config.dead_window_tokens) if self.config.architecture != "l1" else None
        out = self._reduce_gradients(member, member.gradients(x_n, coefficient, dead))
        loss = out.mse + out.penalty
        if not torch.isfinite(loss):
            raise NonFiniteError(step, f"loss of SAE {index}")
        self._clip_and_check(index, member, step)
        return out, loss

    def _sae_update(self, member: _Member, out: Any, loss: Tensor, x_n: Tensor, lr: float,
                    is_log: bool, step: int) -> tuple[float, dict[str, float]] | None:
        for group in member.optimizer.param_groups:
            group["lr"] = lr
        member.optimizer.step()
        member.gradients.after_step_(step)
        member.firing.update_(out.fired, x_n.shape[0] * self.world_size)
        if not is_log:
            return None
        metrics = self._batch_metrics(x_n, out)
        if self.config.architecture != "l1":
            metrics["auxk_loss"] = out.penalty.item()  # weighted, as in the loss
        return loss.item(), metrics

    def _check_input(self, x: Tensor, step: int) -> None:
        if not torch.isfinite(x).all():
            raise NonFiniteError(step, "activations (input batch)")

    def _reduce_gradients(self, member: _Member, out: StepForward) -> StepForward:
        """Data parallel: average the gradients and losses over ranks, sum the firing counts."""
        return out

    def _batch_metrics(self, x_n: Tensor, out: StepForward) -> dict[str, float]:
        return batch_metrics(x_n, out.x_hat, out.z, out.decoder_norms, scale=self.scale)

    def _stop_requested(self) -> bool:
        return self._interrupt_requested

    def _clip_and_check(self, index: int, member: _Member, step: int) -> None:
        params = list(member.sae.parameters())
        max_norm = self.config.grad_clip_norm if self.config.grad_clip_norm is not None else math.inf
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if not torch.isfinite(total):
            bad = next((name for name, p in member.sae.named_parameters()
                        if p.grad is not None and not torch.isfinite(p.grad).all()), "gradient norm")
            raise NonFiniteError(step, f"gradient of SAE {index} {bad}")

    def _resample(self, member: _Member, x_n: Tensor) -> int:
        dead = member.firing.dead_mask(self.config.dead_window_tokens)
        count = resample_dead_(member.sae, member.optimizer, dead, x_n, generator=self.generator,
                               encoder_scale=self.config.resample_encoder_scale)
        member.firing.revive_(dead)
        if count:
            log.info("step %d: resampled %d dead latents", self.step + 1, count)
        return count

    # ----------------------------------------------------------------------------- logs and evals
    def _log(self, output: StepOutput, runlog: RunLog) -> None:
        cfg = self.config
        for index, member in enumerate(self.members):
            record = {"step": output.step, "tokens": self.tokens_seen, "lr": output.lr,
                      **({"l1_coefficient": member.l1_coefficient * output.l1_scale} if cfg.architecture == "l1" else {}),
                      "loss": output.losses[index],
                      **output.metrics[index], "dead_fraction": member.firing.dead_fraction(cfg.dead_window_tokens),
                      "dense_fraction": member.firing.dense_fraction(cfg.dense_threshold)}
            if len(self.members) > 1:
                record["sae"] = index
            member.firing.reset_window_()
            runlog.write(record)

    def _evaluate(self, runlog: RunLog) -> None:
        """The one evaluator (`patching.splice.evaluate_sae`, SAEBench's figures under their SAELens
        names, `eval/<name>`) on the eval rows, configured as `latentpatch eval` and the release
        registry run it, so that the three print the same figures for the same SAE and rows. It
        measures the SAE as it will be saved (the normalization scale folded into the weights):
        bit for bit the figures `latentpatch eval` gives for the saved folder."""
        from patching.splice.evaluation import EvalConfig, evaluate_sae

        config = EvalConfig(context_size=max(2, self.eval_tokens.shape[1]), progress=False)
        for index, member in enumerate(self.members):
            figures = evaluate_sae(self.model, member.sae.folded(), self.eval_tokens, config=config).figures()
            record = {"step": self.step, "tokens": self.tokens_seen, **{f"eval/{k}": v for k, v in figures.items()}}
            if len(self.members) > 1:
                record["sae"] = index
            runlog.write(record)

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: parameters, optimizers, counters, RNGs, data."""
        stateful = isinstance(self.batches, StatefulSource)
        return {"step": self.step, "tokens_seen": self.tokens_seen, "batches_consumed": self.batches_consumed,
                "scale": self.scale, "generator": self.generator.get_state(), "rng": ckpt.rng_state(),
                "data": self.batches.state_dict() if stateful else None,
                "saes": [{"params": dict(m.sae.state_dict()), "optimizer": ckpt.optimizer_to_checkpoint(m.optimizer),
                          "firing": m.firing.state_dict()} for m in self.members]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.batches_consumed, self.scale = int(state["batches_consumed"]), state["scale"]
        self.generator.set_state(state["generator"])
        for member, saved in zip(self.members, state["saes"], strict=True):
            self._set_scale(member.sae)
            member.sae.load_state_dict(saved["params"])
            member.optimizer.load_state_dict(ckpt.optimizer_from_checkpoint(saved["optimizer"]))
            member.firing.load_state_dict(saved["firing"])
        if state["data"] is not None:
            self.batches.load_state_dict(state["data"])
        else:
            skip_batches(self.batches, self.batches_consumed)
        ckpt.set_rng_state(state["rng"])

    def _checkpoint_when_exhausted(self) -> Path | None:
        return self._checkpoint()

    def _checkpoint(self) -> Path | None:
        if self.checkpoint_root is None or self.step == 0:
            return None
        return ckpt.write_checkpoint(self.checkpoint_root, self.step, self.state_dict(), fingerprint=self.fingerprint,
                                     keep=self.config.keep_checkpoints)

    def resume(self, checkpoint: str | Path | None = None) -> int:
        """Load `checkpoint` (default: the newest verified one under out_dir) and return its step."""
        folder = Path(checkpoint) if checkpoint is not None else ckpt.latest_checkpoint(self.checkpoint_root or "")
        if folder is None:
            raise TrainingConfigError(f"no complete checkpoint under {self.checkpoint_root}; start without resume")
        step, state = ckpt.load_checkpoint(folder, fingerprint=self.fingerprint)
        self.load_state_dict(state)
        log.info("resumed from %s at step %d", folder, step)
        return step

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write each SAE folder (normalization folded into the weights): out_dir, or out_dir/sae-i."""
        out_dir = Path(out_dir)
        if self.single:
            return [self.members[0].sae.save(out_dir)]
        return [m.sae.save(out_dir / f"sae-{i}") for i, m in enumerate(self.members)]

    @contextlib.contextmanager
    def _sigint_deferred(self) -> Iterator[None]:
        """While training, a first Ctrl-C or SIGTERM (`kill`, a scheduler ending a job) only asks
        the loop to stop after the running step; a second one stops at once."""
        self._interrupt_requested = False
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}

        def request_stop(signum: int, frame: Any) -> None:
            if self._interrupt_requested:
                raise KeyboardInterrupt
            self._interrupt_requested = True
            log.warning("%s: finishing step %d, then writing a checkpoint", signal.Signals(signum).name, self.step + 1)

        for number in previous:
            signal.signal(number, request_stop)
        try:
            yield
        finally:
            for number, handler in previous.items():  # None: set outside Python, which cannot be restored
                signal.signal(number, signal.SIG_DFL if handler is None else handler)
