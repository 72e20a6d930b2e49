"""The splice room: typed latent edits, the splicer that inserts SAEs at their sites (error-term
and bottleneck modes), collecting an SAE's latents over a corpus, and splice quality (CE loss
recovered, KL, explained variance, L0).

Imports `model` below it."""

from patching.splice.edits import ErrorPatch, LatentEdit, LatentPatch
from patching.splice.splicer import SiteRecord, Splice, resolve_saes, splice
from patching.splice.collect import Corpus, iter_site_latents, iter_site_values, resolve_site
from patching.splice.generate import Interventions, Sampling, Step, generate, intervening
from patching.splice.quality import SpliceMetrics, splice_metrics

__all__ = ["Corpus", "ErrorPatch", "Interventions", "LatentEdit", "LatentPatch", "Sampling", "SiteRecord", "Splice", "SpliceMetrics", "Step", "generate", "intervening", "iter_site_latents", "iter_site_values", "resolve_saes", "resolve_site", "splice", "splice_metrics"]
