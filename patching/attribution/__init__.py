"""The attribution room: gradient estimators of patching effects (AtP, integrated gradients,
AtP*-GradDrop, AtP*'s QK fix for attention queries and keys), `verify` against exact patching, and restoration curves (the top n units patched
jointly and exactly).

Imports `model`, `splice` and `sweep` below it."""

from patching.attribution.estimators import attribute_latents
from patching.attribution.qk_fix import QKConfig, attribute_qk
from patching.attribution.restoration import RestorationCurve, latent_restoration, raw_restoration
from patching.attribution.verify import Verification, verify

__all__ = ["QKConfig", "RestorationCurve", "Verification", "attribute_latents", "attribute_qk", "latent_restoration", "raw_restoration", "verify"]
