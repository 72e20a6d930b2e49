"""Which hand-written step trains an SAE, and which SAE each objective trains.

`l1` trains `standard` (ReLU) SAEs with training/trainer/step.py; `topk` trains `topk` SAEs and
`batchtopk` trains `jumprelu` SAEs (SAELens's inference form of BatchTopK, Bussmann et al. 2024)
with training/trainer/topk_step.py. A JumpReLU SAE's `threshold` is set by the step from the
batches, never by the optimizer, so it is left out of the trained parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from sae.model import SparseAutoencoder
from training.errors import TrainingConfigError
from training.trainer.config import TrainerConfig
from training.trainer.step import L1Gradients
from training.trainer.topk_step import TopKGradients

SAE_ARCHITECTURE = {"l1": "standard", "topk": "topk", "batchtopk": "jumprelu"}
"""The SAE architecture (`SAEConfig.architecture`) each trainer objective trains."""


def check_sae_for(config: TrainerConfig, sae: SparseAutoencoder, index: int, k: int | None) -> None:
    """Refuse, naming what to change, an SAE the objective cannot train."""
    expected = SAE_ARCHITECTURE[config.architecture]
    if sae.cfg.architecture != expected:
        raise TrainingConfigError(f"SAE {index} has architecture {sae.cfg.architecture!r}; the trainer's "
                                  f"{config.architecture!r} objective trains {expected!r} SAEs")
    if config.architecture == "topk" and sae.cfg.k != k:
        raise TrainingConfigError(f"SAE {index} has cfg.k={sae.cfg.k} but TrainerConfig gives it k={k}")
    if config.architecture == "batchtopk" and k is not None and not k < sae.cfg.d_sae:
        raise TrainingConfigError(f"BatchTopK needs k < d_sae, got k={k} for SAE {index} with d_sae={sae.cfg.d_sae}")


def make_gradients(config: TrainerConfig, sae: SparseAutoencoder, k: int | None) -> L1Gradients | TopKGradients:
    """The step object that computes this SAE's loss and writes its gradients."""
    if config.architecture == "l1":
        return L1Gradients(sae)
    assert k is not None  # TrainerConfig.__post_init__ requires k for topk and batchtopk
    return TopKGradients(sae, k=k, batch_level=config.architecture == "batchtopk",
                         auxk_coefficient=float(config.auxk_coefficient), k_aux=config.k_aux,
                         threshold_lr=float(config.batchtopk_threshold_lr))


def trained_parameters(sae: SparseAutoencoder) -> list[nn.Parameter]:
    """The parameters the optimizer steps: all but a JumpReLU threshold."""
    return [p for name, p in sae.named_parameters() if name != "threshold"]


def check_saes(saes: list[SparseAutoencoder]) -> None:
    if not saes:
        raise TrainingConfigError("Trainer needs at least one SAE")
    for index, sae in enumerate(saes):
        if not isinstance(sae, SparseAutoencoder):
            raise TrainingConfigError(f"SAE {index} is a {type(sae).__name__}; the trainer trains latentpatch "
                                      "SparseAutoencoder objects (raw W_enc, b_enc, W_dec, b_dec)")
        if sae.cfg.d_in != saes[0].cfg.d_in:
            raise TrainingConfigError(f"SAE {index} has d_in={sae.cfg.d_in}, SAE 0 has {saes[0].cfg.d_in}: SAEs "
                                      "trained together read the same activations")
        if sae.cfg.normalization_scale is not None:
            raise TrainingConfigError(f"SAE {index} already has normalization_scale={sae.cfg.normalization_scale}; "
                                      "the trainer estimates it (pass a fresh SAE)")


def cfg_identity(sae: SparseAutoencoder) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(sae.cfg).items() if k != "normalization_scale"}
