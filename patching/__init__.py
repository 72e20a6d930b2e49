"""latentpatch's model side, in rooms that import only downward (a test enforces it):

    model/        TransformerLens access (the only importer of it), loading models, Site, tokenising
    splice/       typed edits, the splicer, collecting latents over a corpus, splice quality
    sweep/        metrics, prompt pairs, units, the batched exact engine, results and plots
    attribution/  AtP, integrated gradients, AtP*-GradDrop, verify against exact, restoration curves
    paths/        path patching, edge attribution and circuits (faithfulness, completeness)
    tracing/      Gaussian-noise corruption, ROME's causal tracing, self-repair (the Hydra effect)
    steering/  inspect/  safety/   the three uses; they never import each other

`errors`, `figures`, `configs` (one way to pass a config) and `saved` (the result contract) sit
below every room. This module re-exports the public API of every room (and `import latentpatch`
re-exports this, `sae` and `training`: one public namespace).

The convention every public function keeps (issue 25; names in the glossary of the docs):

- Arguments: `fn(model, sae_or_saes, clean, corrupted, metric, ..., *, config=None, **overrides)`.
  The model comes first, the SAE(s) second (a `{Site: SAE}` mapping or one SAE at its own hook;
  `site=` only overrides that hook), the inputs next; everything optional is keyword-only.
- Configs: a frozen config dataclass passed as `config=`, single fields overridden by keyword
  (`find_safety_latents(model, sae, max_pairs=8)`), resolved by `configs.resolve_config`.
- "How many" is `k` (the top k units, latents, contexts); `random_k` and the `k_*` fields of a
  config name other counts the same way. Batch sizing is `batch_size` (rows per forward), with
  `memory_mb` the budget a sweep derives it from when left out.
- `direction` means only "denoise" or "noise" (the patching direction); a residual direction read
  like a neuron is a `NeuronDirection`. A sweep's units are chosen with `units=` (a kind from
  `unit_kinds()`, or explicit `PatchUnit`s); a metric is the `Metric` protocol, with `bind` for
  one that needs the unpatched runs (`ReferenceRuns`).
- Results: `save(folder)`, `Type.load(folder)`, `plot(path)` and `to_dataframe()`, and one
  provenance record built by `provenance(...)` (model, SAE hashes, prompts, metric, direction,
  versions, time).
- Errors: every typed error derives from `LatentpatchError`.
- Old names (`Direction`, `unit=`, `top_k=`, `n_top=`, `batch_rows=`, `settings=`, a positional
  config, `latent_restoration(model, site, sae, ...)`, `.table()`) keep working for one release
  with a `DeprecationWarning`.
"""

from patching.errors import ModelLoadError, PatchingError, SiteError, SpliceError, SteeringError
from patching.model import (
    DEFAULT_MODEL, ModelFlags, ModelOrigin, Site, as_site, cache_root, library_version, load_model, load_model_for,
    model_flags, padded_tokens, provenance,
)
from patching.splice import (
    Corpus, ErrorPatch, EvalConfig, Interventions, LatentEdit, LatentPatch, ProbeConfig, ProbeSplit, ProbingResult,
    SAEEvaluation, Sampling, SiteRecord, Splice, SpliceChecks, SpliceMetrics, Step, TaskScores, collect_probe_features,
    evaluate_sae, evaluate_saes, generate, intervening, iter_site_latents, iter_site_values, resolve_saes, resolve_site,
    save_evaluation, sparse_probe, splice, splice_metrics,
)
from patching.sweep import (
    CallableMetric, ErrorShare, ErrorShareConfig, KLFromClean, LogitDiff, Metric, PatchResult, PatchUnit, PromptPair,
    ReferenceRuns, TokenLogProb, TokenProb, TopEntry, UnitPart, as_metric, error_share, make_pairs, patch_heads,
    patch_latents, patch_residual, register_unit_kind, unit_kinds,
)
from patching.attribution import (
    QKConfig, RestorationCurve, Verification, attribute_latents, attribute_qk, latent_restoration, raw_restoration, verify,
)
from patching.paths import (
    CircuitConfig, CircuitResult, EdgeConfig, Faithfulness, LatentEdgeConfig, LatentGraph, LatentNode, MixedCircuitResult,
    MixedEdges, Node, PathConfig, PathResult, Receiver, attribute_edges, attribute_latent_edges, attribute_mixed_edges,
    faithfulness, find_circuit, latent_faithfulness, mixed_faithfulness, mixed_nodes, patch_paths, receivers_of,
    upstream_nodes,
)
from patching.tracing import (
    Component, NoiseConfig, RepairResult, TraceResult, causal_trace, embedding_std, self_repair, subject_positions,
    window_layers,
)
from patching.steering import (
    CONCEPTS, CompareSettings, Concept, LatentChoice, SteeredGeneration, Steering, SteeringComparison, SteeringConfig,
    compare_steering, contrast_latents, generate_steered, latents_from_result, steer, steering_vector,
)
from patching.inspect import (
    Decomposition, InspectConfig, LatentReport, Neuron, NeuronConfig, NeuronDirection, UnitReport, UnitScores, decompose,
    inspect_latent, inspect_latents, inspect_units, logit_effect, readout, unit_scores, write_dashboards,
)
from patching.safety import (
    DirectionReport, GuidedGeneration, NamedPair, PAIRS, PairSetConfig, PairSetShares, RefusalScore, SafetyConfig,
    SafetyReport, SafetySuite, UnitCurve, UnitSet, find_safety_latents, guided_generate, is_refusal, named_pairs,
    pair_set_error_share, refusal_directions, refusal_rate,
)
from sae.deprecation import renamed_attributes
from sae.errors import LatentpatchError

__all__ = [
    "CONCEPTS", "CallableMetric", "CircuitConfig", "CircuitResult", "CompareSettings", "Component", "Concept",
    "Corpus", "DEFAULT_MODEL", "Decomposition", "DirectionReport", "EdgeConfig", "ErrorPatch", "ErrorShare",
    "ErrorShareConfig", "EvalConfig", "Faithfulness", "GuidedGeneration", "InspectConfig", "Interventions",
    "KLFromClean", "LatentChoice", "LatentEdgeConfig", "LatentEdit", "LatentGraph", "LatentNode", "LatentPatch",
    "LatentReport", "LatentpatchError", "LogitDiff", "Metric", "MixedCircuitResult", "MixedEdges", "ModelFlags", "ModelLoadError", "ModelOrigin",
    "NamedPair", "Neuron", "NeuronConfig", "NeuronDirection", "Node", "NoiseConfig", "PAIRS", "PairSetConfig",
    "PairSetShares", "PatchResult", "PatchUnit", "PatchingError", "PathConfig", "PathResult", "ProbeConfig",
    "ProbeSplit", "ProbingResult", "PromptPair", "QKConfig", "Receiver", "ReferenceRuns", "RefusalScore",
    "RepairResult", "RestorationCurve", "SAEEvaluation", "SafetyConfig", "SafetyReport", "SafetySuite", "Sampling",
    "Site", "SiteError", "SiteRecord", "Splice", "SpliceChecks", "SpliceError", "SpliceMetrics", "SteeredGeneration",
    "Steering", "SteeringComparison", "SteeringConfig", "SteeringError", "Step", "TaskScores", "TokenLogProb",
    "TokenProb", "TopEntry", "TraceResult", "UnitCurve", "UnitPart", "UnitReport", "UnitScores", "UnitSet",
    "Verification", "as_metric", "as_site", "attribute_edges", "attribute_latent_edges", "attribute_latents", "attribute_mixed_edges",
    "attribute_qk", "cache_root", "causal_trace", "collect_probe_features", "compare_steering", "contrast_latents",
    "decompose", "embedding_std", "error_share", "evaluate_sae", "evaluate_saes", "faithfulness", "find_circuit",
    "find_safety_latents", "generate", "generate_steered", "guided_generate", "inspect_latent", "inspect_latents",
    "inspect_units", "intervening", "is_refusal", "iter_site_latents", "iter_site_values", "latent_faithfulness", "latent_restoration",
    "latents_from_result", "library_version", "load_model", "load_model_for", "logit_effect", "make_pairs",
    "mixed_faithfulness", "mixed_nodes", "model_flags", "named_pairs", "padded_tokens", "pair_set_error_share", "patch_heads", "patch_latents",
    "patch_paths", "patch_residual", "provenance", "raw_restoration", "readout", "receivers_of", "refusal_directions",
    "refusal_rate", "register_unit_kind", "resolve_saes", "resolve_site", "save_evaluation", "self_repair",
    "sparse_probe", "splice", "splice_metrics", "steer", "steering_vector", "subject_positions", "unit_kinds",
    "unit_scores", "upstream_nodes", "verify", "window_layers", "write_dashboards",
]

__getattr__ = renamed_attributes(__name__, {"Direction": lambda: NeuronDirection})
