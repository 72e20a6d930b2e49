"""The model side: loading models, hook sites, the splicer, latent edits and splice metrics."""

from patching.attribution import attribute_latents
from patching.edits import ErrorPatch, LatentEdit, LatentPatch
from patching.errors import ModelLoadError, PatchingError, SiteError, SpliceError
from patching.metrics import SpliceMetrics, padded_tokens, splice_metrics
from patching.models import DEFAULT_MODEL, ModelFlags, ModelOrigin, load_model
from patching.objectives import CallableMetric, KLFromClean, LogitDiff, TokenLogProb, TokenProb
from patching.patch import patch_latents, patch_residual
from patching.results import PatchResult, TopEntry
from patching.sites import Site
from patching.splice import SiteRecord, Splice, splice
from patching.units import PatchUnit, UnitPart
from patching.verify import Verification, verify
from patching.latent_inspect import InspectConfig, LatentReport, inspect_latent, inspect_latents, logit_effect
from patching.steering import (LatentChoice, SteeredGeneration, Steering, SteeringConfig, SteeringError,
                               contrast_latents, generate_steered, latents_from_result, steer, steering_vector)
from patching.steering_compare import CompareSettings, Concept, SteeringComparison, compare_steering

__all__ = [
    "CallableMetric",
    "DEFAULT_MODEL",
    "Verification",
    "attribute_latents",
    "verify",
    "ErrorPatch",
    "KLFromClean",
    "LatentEdit",
    "LatentPatch",
    "LogitDiff",
    "PatchResult",
    "PatchUnit",
    "PatchingError",
    "TokenLogProb",
    "TokenProb",
    "TopEntry",
    "UnitPart",
    "ModelFlags",
    "ModelLoadError",
    "ModelOrigin",
    "SiteError",
    "SiteRecord",
    "Splice",
    "SpliceError",
    "SpliceMetrics",
    "Site",
    "load_model",
    "patch_latents",
    "patch_residual",
    "splice",
    "splice_metrics",
    "padded_tokens",
    "CompareSettings",
    "Concept",
    "InspectConfig",
    "LatentChoice",
    "LatentReport",
    "SteeredGeneration",
    "Steering",
    "SteeringComparison",
    "SteeringConfig",
    "SteeringError",
    "compare_steering",
    "contrast_latents",
    "generate_steered",
    "inspect_latent",
    "inspect_latents",
    "latents_from_result",
    "logit_effect",
    "steer",
    "steering_vector",
]

from patching.dashboards import write_dashboards
from patching.neuron_inspect import NeuronConfig, UnitReport, UnitScores, inspect_units, unit_scores
from patching.neurons import Decomposition, Direction, Neuron, decompose, readout
from patching.restoration import RestorationCurve, latent_restoration, raw_restoration

__all__ += [
    "Decomposition",
    "Direction",
    "Neuron",
    "NeuronConfig",
    "RestorationCurve",
    "UnitReport",
    "UnitScores",
    "decompose",
    "inspect_units",
    "latent_restoration",
    "raw_restoration",
    "readout",
    "unit_scores",
    "write_dashboards",
]
