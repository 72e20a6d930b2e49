"""TrainerConfig: the training recipe (L1 by default, or TopK / BatchTopK with AuxK), and nothing
about models, data or paths.

The recipe follows Anthropic's "Towards Monosemanticity" (2023) and its April 2024 update
("Training Sparse Autoencoders", Circuits Updates): Adam, linear lr warmup and a linear decay
over the final part of training, an L1 coefficient warmed up from zero, the L1 weighted by
decoder row norms, inputs scaled to a fixed norm estimated before training, `b_dec`
initialised at the data's geometric median, dead-latent resampling, gradient clipping.
The run configuration (model, site, text, output folder) lives with the command line, in
`latentpatch.cli.train` (`RunConfig`): the library never imports the CLI.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

from training.errors import TrainingConfigError

Objective = Literal["l1", "topk", "batchtopk"]
Normalization = Literal["expected_norm", "none"]
BDecInit = Literal["geometric_median", "mean", "zeros"]


@dataclass(frozen=True)
class TrainerConfig:
    """How to train one or several SAEs on a stream of activation batches."""

    total_steps: int
    """Optimizer steps to take (one batch per step, shared by every SAE trained together)."""
    lr: float = 4e-4
    """Peak Adam learning rate."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's (beta1, beta2)."""
    lr_warmup_fraction: float = 0.01
    """Fraction of `total_steps` over which the lr rises linearly from 0 to `lr`."""
    lr_decay_fraction: float = 0.2
    """Fraction of `total_steps`, at the end, over which the lr falls linearly to 0 (April 2024
    update: the last 20%)."""
    l1_coefficient: float | tuple[float, ...] = 5.0
    """L1 coefficient lambda of `mean ||x - x_hat||^2 + lambda * mean sum_i z_i ||W_dec[i]||`
    (in normalized units). A tuple gives one value per SAE trained together (an L1 sweep)."""
    l1_warmup_fraction: float = 0.05
    """Fraction of `total_steps` over which lambda rises linearly from 0 (April 2024 update: 5%)."""
    architecture: Objective = "l1"
    """The sparsity objective. `l1`: ReLU SAEs (`standard`) with the L1 penalty above. `topk`: keep
    each token's k largest latents (Gao et al. 2024), `topk` SAEs. `batchtopk`: keep the batch's k*B
    largest (Bussmann et al. 2024), trained and saved as `jumprelu` SAEs whose threshold is the
    running batch threshold (SAELens's inference form). TopK and BatchTopK keep decoder rows at
    unit norm, ignore `l1_coefficient` and `decoder_init_norm`, and train dead latents with AuxK
    instead of resampling (see training/trainer/topk_step.py)."""
    k: int | tuple[int, ...] | None = None
    """Latents per token for `topk` / `batchtopk` (an average over the batch for `batchtopk`); a
    tuple gives one per SAE trained together. None for `l1`."""
    auxk_coefficient: float = 1 / 32
    """Weight alpha of the AuxK dead-latent loss (Gao et al. 2024, appendix A.2: 1/32); 0 disables it."""
    k_aux: int | None = None
    """Dead latents AuxK uses per token; None: d_in // 2 (SAELens's heuristic; Gao et al. use 512)."""
    batchtopk_threshold_lr: float = 0.01
    """Rate of the EMA that turns BatchTopK's per-batch thresholds into the inference threshold
    (SAELens's `topk_threshold_lr`); the first 1/rate batches are averaged plainly."""
    grad_clip_norm: float | None = 1.0
    """Clip each SAE's gradient to this global L2 norm; None disables clipping."""
    normalization: Normalization = "expected_norm"
    """`expected_norm`: divide inputs by a fixed scalar s so that E||x/s|| = sqrt(d_in),
    estimated before training and folded into the weights at save. `none`: train on raw inputs."""
    b_dec_init: BDecInit = "geometric_median"
    """Initial `b_dec`: the geometric median (Towards Monosemanticity), the mean, or zeros."""
    decoder_init_norm: float | None = 0.1
    """Before training, rescale decoder rows to this norm and tie the encoder to the decoder's
    transpose (April 2024 update: "fixed L2 norm of 0.05 to 1"; SAELens uses 0.1). Small rows
    keep the first reconstructions near b_dec. None keeps the SAE's own initialisation."""
    init_batches: int = 4
    """Batches read (and not trained on) before step 1 to estimate the scale and `b_dec`."""
    dead_window_tokens: int = 1_000_000
    """A latent that has not fired on any of the last this many tokens counts as dead."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of tokens (between two logs) counts as dense."""
    resample_steps: tuple[int, ...] = ()
    """Steps after which dead latents are resampled (Towards Monosemanticity used 25k, 50k, 75k
    and 100k of 200k+); empty disables resampling."""
    resample_encoder_scale: float = 0.2
    """A resampled encoder column gets this multiple of the mean alive encoder norm."""
    log_every: int = 50
    """Steps between metric records (JSONL log, progress bar, wandb)."""
    eval_every: int | None = None
    """Steps between evaluations (`patching.splice.evaluate_sae`) on held-out rows (needs a model); None: never."""
    checkpoint_every: int | None = 1000
    """Steps between checkpoints (one is also written at the end); None: only at the end."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept on disk; at least two, so a crash while writing one leaves another."""
    seed: int = 0
    """Seed of the trainer's own generator (resampling) and of the global torch, numpy and Python
    RNGs at the start of a fresh run."""
    progress_bar: bool = True
    """Show a tqdm bar with the latest figures."""

    def __post_init__(self) -> None:
        _check_int(self, "total_steps", minimum=1)
        for name in ("init_batches", "log_every", "dead_window_tokens"):
            _check_int(self, name, minimum=1)
        _check_int(self, "keep_checkpoints", minimum=2)
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) is not None:
                _check_int(self, name, minimum=1)
        _check_positive_reals(self)
        if not (len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas)):
            raise TrainingConfigError(f"TrainerConfig.adam_betas must be two floats in [0, 1), got {self.adam_betas!r}")
        for name in ("lr_warmup_fraction", "lr_decay_fraction", "l1_warmup_fraction", "dense_threshold"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise TrainingConfigError(f"TrainerConfig.{name} must be in [0, 1], got {value!r}")
        if self.lr_warmup_fraction + self.lr_decay_fraction > 1:
            raise TrainingConfigError(
                f"lr_warmup_fraction + lr_decay_fraction = {self.lr_warmup_fraction + self.lr_decay_fraction} "
                "exceeds 1; shorten one of them")
        coefficients = self.l1_coefficient if isinstance(self.l1_coefficient, (tuple, list)) else (self.l1_coefficient,)
        if not coefficients or any(isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c < math.inf
                                   for c in coefficients):
            raise TrainingConfigError(f"TrainerConfig.l1_coefficient must be finite and >= 0 (or a non-empty tuple of such), "
                                      f"got {self.l1_coefficient!r}")
        bad = [s for s in self.resample_steps if not (isinstance(s, int) and 0 < s < self.total_steps)]
        if bad or list(self.resample_steps) != sorted(set(self.resample_steps)):
            raise TrainingConfigError(f"TrainerConfig.resample_steps must be increasing steps in 1..{self.total_steps - 1}, "
                                      f"got {self.resample_steps!r}")
        for name, kind in (("normalization", Normalization), ("b_dec_init", BDecInit), ("architecture", Objective)):
            if getattr(self, name) not in get_args(kind):
                raise TrainingConfigError(f"TrainerConfig.{name} must be one of {get_args(kind)}, got {getattr(self, name)!r}")
        _check_objective(self)
        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))
        object.__setattr__(self, "resample_steps", tuple(self.resample_steps))

    @property
    def l1_coefficients(self) -> tuple[float, ...]:
        c = self.l1_coefficient
        return tuple(float(v) for v in c) if isinstance(c, (tuple, list)) else (float(c),)

    def l1_for(self, n_saes: int) -> tuple[float, ...]:
        """One lambda per SAE: a single value is shared, a tuple must have one per SAE."""
        coefficients = self.l1_coefficients
        if len(coefficients) == 1:
            return coefficients * n_saes
        if len(coefficients) != n_saes:
            raise TrainingConfigError(f"l1_coefficient has {len(coefficients)} values but {n_saes} SAEs are trained; "
                                      "give one value or one per SAE")
        return coefficients

    @property
    def ks(self) -> tuple[int, ...]:
        """The k values (empty for `l1`)."""
        return () if self.k is None else tuple(self.k) if isinstance(self.k, (tuple, list)) else (self.k,)

    def k_for(self, n_saes: int) -> tuple[int | None, ...]:
        """One k per SAE (None each for `l1`): a single value is shared, a tuple must have one per SAE."""
        ks = self.ks
        if not ks:
            return (None,) * n_saes
        if len(ks) == 1:
            return ks * n_saes
        if len(ks) != n_saes:
            raise TrainingConfigError(f"k has {len(ks)} values but {n_saes} SAEs are trained; give one value or one per SAE")
        return ks

    @property
    def lr_warmup_steps(self) -> int:
        return round(self.lr_warmup_fraction * self.total_steps)

    @property
    def lr_decay_steps(self) -> int:
        return round(self.lr_decay_fraction * self.total_steps)

    @property
    def l1_warmup_steps(self) -> int:
        return round(self.l1_warmup_fraction * self.total_steps)

    def lr_at(self, step: int) -> float:
        """Learning rate for step `step` (1-based): linear warmup, flat, linear decay to 0."""
        warm, decay = self.lr_warmup_steps, self.lr_decay_steps
        if warm and step <= warm:
            return self.lr * step / warm
        decay_start = self.total_steps - decay
        if decay and step > decay_start:
            return self.lr * (self.total_steps - step + 1) / (decay + 1)
        return self.lr

    def l1_scale_at(self, step: int) -> float:
        """Multiplier of every lambda at step `step` (1-based): linear warmup from 0 to 1."""
        warm = self.l1_warmup_steps
        return min(1.0, step / warm) if warm else 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, *extra: Any) -> str:
        """SHA-256 of this config and `extra` (SAE configs, data description): resume checks it."""
        blob = json.dumps([self.to_dict(), *extra], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


def _check_int(cfg: TrainerConfig, name: str, *, minimum: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TrainingConfigError(f"TrainerConfig.{name} must be an int >= {minimum}, got {value!r}")


def _check_objective(cfg: TrainerConfig) -> None:
    """k belongs to TopK/BatchTopK; resampling to L1 (AuxK is TopK's own remedy for dead latents)."""
    if cfg.architecture == "l1":
        if cfg.k is not None:
            raise TrainingConfigError(f"TrainerConfig.k={cfg.k!r} is only used by architecture 'topk' or "
                                      "'batchtopk'; drop it or set architecture")
    elif not cfg.ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in cfg.ks):
        raise TrainingConfigError(f"architecture {cfg.architecture!r} needs k: a positive int or a tuple of them, "
                                  f"got {cfg.k!r}")
    elif cfg.resample_steps:
        # AuxK already trains dead latents on the residual the live ones leave (Gao et al. 2024, A.2),
        # and resampling's loss weights assume the ReLU encoder: one remedy per objective.
        raise TrainingConfigError(f"resample_steps={cfg.resample_steps} applies to architecture 'l1' only; "
                                  f"{cfg.architecture!r} revives dead latents with AuxK (auxk_coefficient)")
    if isinstance(cfg.k, list):
        object.__setattr__(cfg, "k", tuple(cfg.k))
    if isinstance(cfg.auxk_coefficient, bool) or not isinstance(cfg.auxk_coefficient, (int, float)) or not (
            math.isfinite(cfg.auxk_coefficient) and cfg.auxk_coefficient >= 0):
        raise TrainingConfigError(f"TrainerConfig.auxk_coefficient must be finite and >= 0, got {cfg.auxk_coefficient!r}")
    if cfg.k_aux is not None:
        _check_int(cfg, "k_aux", minimum=1)
    rate = cfg.batchtopk_threshold_lr
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        raise TrainingConfigError(f"TrainerConfig.batchtopk_threshold_lr must be in (0, 1], got {rate!r}")


def _check_positive_reals(cfg: TrainerConfig) -> None:
    """Every positive real field finite: `lr=inf` passes `> 0` and fills the parameters with inf at
    the first optimizer step, after the gradient checks have passed."""
    for name, optional in (("lr", False), ("grad_clip_norm", True), ("decoder_init_norm", True),
                           ("resample_encoder_scale", False)):
        value = getattr(cfg, name)
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise TrainingConfigError(f"TrainerConfig.{name} must be a positive finite number"
                                      f"{' or None' if optional else ''}, got {value!r}")
