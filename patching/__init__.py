"""latentpatch's model side, in rooms that import only downward (a test enforces it):

    model/        TransformerLens access (the only importer of it), loading models, Site, tokenising
    splice/       typed edits, the splicer, collecting latents over a corpus, splice quality
    sweep/        metrics, prompt pairs, units, the batched exact engine, results and plots
    attribution/  AtP, integrated gradients, AtP*-GradDrop, verify against exact, restoration curves
    tracing/      Gaussian-noise corruption, ROME's causal tracing, self-repair (the Hydra effect)
    steering/  inspect/  safety/   the three uses; they never import each other

`errors` and `figures` sit below every room. This module re-exports the public API of each room.
"""

from patching.attribution import RestorationCurve, Verification, attribute_latents, latent_restoration, raw_restoration, verify
from patching.errors import ModelLoadError, PatchingError, SiteError, SpliceError
from patching.inspect import (
                                  Decomposition,
                                  Direction,
                                  InspectConfig,
                                  LatentReport,
                                  Neuron,
                                  NeuronConfig,
                                  UnitReport,
                                  UnitScores,
                                  decompose,
                                  inspect_latent,
                                  inspect_latents,
                                  inspect_units,
                                  logit_effect,
                                  readout,
                                  unit_scores,
                                  write_dashboards,
)
from patching.model import DEFAULT_MODEL, ModelFlags, ModelOrigin, Site, load_model, load_model_for, padded_tokens
from patching.safety import (PAIRS, RefusalScore, SafetyConfig, SafetyReport, SafetySuite, find_safety_latents, is_refusal,
                             refusal_rate)
from patching.splice import ErrorPatch, LatentEdit, LatentPatch, SiteRecord, Splice, SpliceMetrics, splice, splice_metrics
from patching.steering import (CompareSettings, Concept, LatentChoice, SteeredGeneration, Steering, SteeringComparison,
                               SteeringConfig, SteeringError, compare_steering, contrast_latents, generate_steered,
                               latents_from_result, steer, steering_vector)
from patching.sweep import (CallableMetric, KLFromClean, LogitDiff, PatchResult, PatchUnit, TokenLogProb, TokenProb,
                            TopEntry, UnitPart, patch_heads, patch_latents, patch_residual)

__all__ = [
    "CallableMetric", "CompareSettings", "Concept", "DEFAULT_MODEL", "Decomposition", "Direction", "ErrorPatch",
    "InspectConfig", "KLFromClean", "LatentChoice", "LatentEdit", "LatentPatch", "LatentReport", "LogitDiff",
    "ModelFlags", "ModelLoadError", "ModelOrigin", "Neuron", "NeuronConfig", "PAIRS", "PatchResult", "PatchUnit",
    "PatchingError", "RefusalScore", "RestorationCurve", "SafetyConfig", "SafetyReport", "SafetySuite", "Site", "SiteError",
    "SiteRecord", "Splice", "SpliceError", "SpliceMetrics", "SteeredGeneration", "Steering", "SteeringComparison",
    "SteeringConfig", "SteeringError", "TokenLogProb", "TokenProb", "TopEntry", "UnitPart", "UnitReport",
    "UnitScores", "Verification", "attribute_latents", "compare_steering", "contrast_latents", "decompose",
    "find_safety_latents", "generate_steered", "inspect_latent", "inspect_latents", "inspect_units", "is_refusal",
    "latent_restoration", "latents_from_result", "load_model", "load_model_for", "logit_effect", "padded_tokens", "patch_heads", "patch_latents",
    "patch_residual", "raw_restoration", "readout", "refusal_rate", "splice", "splice_metrics", "steer",
    "steering_vector", "unit_scores", "verify", "write_dashboards",
]
