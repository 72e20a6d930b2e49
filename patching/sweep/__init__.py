"""The sweep room: metrics (objectives), prompt pairs and alignment, patch units, the batched
exact engine, `patch_latents` / `patch_residual`, and results with their plots.

Imports `model` and `splice` below it."""

from patching.sweep.objectives import (CallableMetric, KLFromClean, LogitDiff, Metric, ReferenceRuns, TokenLogProb, TokenProb,
                                       as_metric)
from patching.sweep.pairs import PromptPair, make_pairs
from patching.sweep.error_share import ErrorShare, ErrorShareConfig, error_share
from patching.sweep.units import PatchUnit, UnitPart, register_unit_kind, unit_kinds
from patching.sweep.patch import patch_heads, patch_latents, patch_residual
from patching.sweep.results import PatchResult, TopEntry, library_version

__all__ = [
    "CallableMetric", "ErrorShare", "ErrorShareConfig", "KLFromClean", "LogitDiff", "Metric", "PatchResult", "PatchUnit",
    "PromptPair", "ReferenceRuns", "TokenLogProb", "TokenProb", "TopEntry", "UnitPart", "as_metric", "error_share",
    "library_version", "make_pairs", "patch_heads", "patch_latents", "patch_residual", "register_unit_kind", "unit_kinds",
]
