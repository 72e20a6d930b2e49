"""The model side: loading models, hook sites, the splicer, latent edits and splice metrics."""

from patching.edits import LatentEdit
from patching.errors import ModelLoadError, SiteError, SpliceError
from patching.metrics import SpliceMetrics, splice_metrics
from patching.models import DEFAULT_MODEL, ModelFlags, ModelOrigin, load_model
from patching.sites import Site
from patching.splice import SiteRecord, Splice, splice

__all__ = [
    "DEFAULT_MODEL",
    "LatentEdit",
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
    "splice",
    "splice_metrics",
]
