"""The model side: loading models, hook sites, the splicer, latent edits and splice metrics."""

from patching.attribution import attribute_latents
from patching.edits import ErrorPatch, LatentEdit, LatentPatch
from patching.errors import ModelLoadError, PatchingError, SiteError, SpliceError
from patching.metrics import SpliceMetrics, splice_metrics
from patching.models import DEFAULT_MODEL, ModelFlags, ModelOrigin, load_model
from patching.objectives import CallableMetric, KLFromClean, LogitDiff, TokenLogProb, TokenProb
from patching.patch import patch_latents, patch_residual
from patching.results import PatchResult, TopEntry
from patching.sites import Site
from patching.splice import SiteRecord, Splice, splice
from patching.units import PatchUnit, UnitPart
from patching.verify import Verification, verify

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
]
