"""The splice room: typed latent edits, the splicer that inserts SAEs at their sites (error-term
and bottleneck modes), collecting an SAE's latents over a corpus, and splice quality (CE loss
recovered, KL, explained variance, L0), SAEBench's core evaluation streamed over many texts, and
SAEBench's sparse probing.

Imports `model` below it."""

from patching.splice.collect import Corpus, iter_site_latents, iter_site_values, resolve_site
from patching.splice.edits import ErrorPatch, LatentEdit, LatentPatch
from patching.splice.evaluation import EvalConfig, SAEEvaluation, evaluate_sae, evaluate_saes
from patching.splice.evaluation_files import save_evaluation
from patching.splice.probing import (ProbeConfig, ProbeSplit, ProbingResult, TaskScores, collect_probe_features,
                                     sparse_probe)
from patching.splice.generate import Interventions, Sampling, Step, generate, intervening
from patching.splice.quality import SpliceMetrics, splice_metrics
from patching.splice.splicer import SiteRecord, Splice, SpliceChecks, resolve_saes, splice

__all__ = [
    "Corpus", "ErrorPatch", "EvalConfig", "Interventions", "LatentEdit", "LatentPatch", "ProbeConfig", "ProbeSplit",
    "ProbingResult", "SAEEvaluation", "Sampling", "SiteRecord", "Splice", "SpliceChecks", "SpliceMetrics", "Step",
    "TaskScores", "collect_probe_features", "evaluate_sae", "evaluate_saes", "generate", "intervening", "iter_site_latents",
    "iter_site_values", "resolve_saes", "resolve_site", "save_evaluation", "sparse_probe", "splice", "splice_metrics",
]
