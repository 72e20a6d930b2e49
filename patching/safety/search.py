"""The search for the units behind refusal, end to end (`find_safety_latents`).

1. Refusal rates (greedy, KV-cached) on the suite's harmful, harmless, jailbreak and control
   prompts, and each pair's span: refusal score(harmful) − refusal score(harmless).
2. On the pairs whose span clears `span_threshold`, restoration curves for every unit kind
   (`patching.safety.units`), against the percent of active units.
3. The refusal direction at each layer: ablation on harmful prompts, addition on harmless ones,
   the SAE latents aligned with it and steering with them (`patching.safety.direction`).
4. Dynamic activation patching of the top-n MLP neurons (or latents) from a guiding run on the
   plain request into generation on its jailbreak-wrapped version, and on wrapped controls
   (`patching.safety.dynamic`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor
from tqdm.auto import tqdm

from patching.configs import resolve_config
from patching.errors import PatchingError
from patching.model import tl_compat
from patching.model.provenance import provenance
from patching.model.sites import Site
from patching.safety.curves import DEFAULT_PERCENTS, pairs_clearing
from patching.safety.direction import aligned_latents, direction_effects
from patching.safety.dynamic import dynamic_table
from patching.safety.prompts import SafetySuite
from patching.safety.report import REFUSAL_METRIC, SafetyReport
from patching.safety.score import RefusalScore, greedy_scored, greedy_texts, query_start, refusal_rate, tokenize_chat
from patching.safety.units import collect_curves, pair_curves
from patching.splice.generate import SharedPrefix
from patching.splice.splicer import resolve_saes
from sae.deprecation import positional_config

DynamicKind = Literal["mlp_post", "latents"]


@dataclass(frozen=True)
class SafetyConfig:
    """What `find_safety_latents` measures and how much of it."""

    percents: tuple[float, ...] = DEFAULT_PERCENTS
    """Percent of active units at which each restoration curve is measured."""
    span_threshold: float = 1.0
    """A pair enters the curves only if refusal score(harmful) − score(harmless) is at least this (nats)."""
    max_pairs: int | None = None
    """At most this many pairs (those with the widest spans first); None: every pair that clears."""
    max_new_tokens: int = 8
    """Greedy tokens generated to judge a refusal."""
    layer: int | None = None
    """Layer of the one-layer MLP, residual and direction curves; None: the first SAE's layer."""
    direction_layers: tuple[int, ...] | None = None
    """Layers whose refusal direction is ablated/added; None: every layer."""
    aligned_ks: tuple[int, ...] = (1, 8)
    """Top-k aligned latents steered with (Top-1 and Top-K)."""
    dynamic_ns: tuple[int, ...] = (10, 100, 1000)
    """Numbers of units copied in dynamic patching (0, no copy, is always measured)."""
    dynamic_kind: DynamicKind = "mlp_post"
    """Units copied: MLP neurons of every layer (Chen et al.), or the first SAE's latents."""
    jailbreak_templates: int | None = 1
    """Jailbreak wrappers used in dynamic patching (the first n of the suite's); None: all."""
    overshoot_margin: float = 0.1
    """Restored fractions above 1 + this are flagged as overshoot."""

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, ok: bool, want: str) -> None:
            if not ok:
                raise PatchingError(f"SafetyConfig.{name} must be {want}, got {value!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        bad("percents", self.percents, bool(self.percents) and all(
            isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p <= 100 for p in self.percents),
            "non-empty numbers in (0, 100]")
        bad("span_threshold", self.span_threshold, isinstance(self.span_threshold, (int, float))
            and not isinstance(self.span_threshold, bool) and 0 < self.span_threshold < math.inf,
            "a positive finite number (inf kept no pair, and the report said nothing)")
        bad("overshoot_margin", self.overshoot_margin, isinstance(self.overshoot_margin, (int, float))
            and not isinstance(self.overshoot_margin, bool) and math.isfinite(self.overshoot_margin)
            and self.overshoot_margin >= 0, "a finite number >= 0")
        bad("max_pairs", self.max_pairs, self.max_pairs is None or (is_int(self.max_pairs) and self.max_pairs >= 1),
            "None or a positive int")
        bad("max_new_tokens", self.max_new_tokens, is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
            "a positive int")
        bad("layer", self.layer, self.layer is None or (is_int(self.layer) and self.layer >= 0), "None or an int >= 0")
        for name in ("direction_layers", "aligned_ks", "dynamic_ns"):
            value = getattr(self, name)
            bad(name, value, value is None and name == "direction_layers" or (
                bool(value) and all(is_int(v) and v >= (0 if name == "direction_layers" else 1) for v in value)),
                "non-empty non-negative ints" if name == "direction_layers" else "non-empty positive ints")
        bad("dynamic_kind", self.dynamic_kind, self.dynamic_kind in ("mlp_post", "latents"), "'mlp_post' or 'latents'")
        bad("jailbreak_templates", self.jailbreak_templates, self.jailbreak_templates is None or (
            is_int(self.jailbreak_templates) and self.jailbreak_templates >= 1), "None or a positive int")


@positional_config
def find_safety_latents(model: Any, saes: Any, suite: SafetySuite | None = None, *, config: SafetyConfig | None = None,
                        progress: bool = True, **overrides: Any) -> SafetyReport:
    """Refusal rates, restoration curves for every unit kind, the refusal direction and dynamic
    patching on `suite` (the full default suite when None). `overrides` replace `config` fields
    (`find_safety_latents(model, sae, max_pairs=8)`); everything is validated before any forward."""
    config = resolve_config(SafetyConfig, config, overrides)
    suite = SafetySuite() if suite is None else suite
    if not isinstance(suite, SafetySuite):  # its own checks run when it is built
        raise PatchingError(f"suite must be a SafetySuite or None, got {type(suite).__name__}")
    resolved = resolve_saes(model, saes)
    layer = next(iter(resolved)).layer if config.layer is None else config.layer
    n_layers = tl_compat.n_layers(model)
    if layer >= n_layers or any(v >= n_layers for v in config.direction_layers or ()):
        raise PatchingError(f"layers must be below n_layers={n_layers}, got layer={layer}, "
                            f"direction_layers={config.direction_layers}")
    if not tl_compat.has_tokenizer(model):
        raise PatchingError("safety experiments need a model with a tokenizer and a chat template")
    harmful, harmless = _pair_tokens(model, suite)
    clock: dict[str, float] = {}
    start_time = time.perf_counter()
    metric = RefusalScore.for_model(model)
    report = SafetyReport([s.hook_name for s in resolved], config, suite, tl_compat.model_name(model),
                          provenance=provenance(model, saes=resolved, prompts=None, metric=REFUSAL_METRIC,
                                                direction="denoise"))
    start = query_start(model, suite)
    prefix = SharedPrefix.of(model, harmful[0][:, :start])  # the few-shot context, run once
    baseline = _rates(model, suite, harmful, harmless, metric, config, report, prefix)
    clock["rates"] = time.perf_counter() - start_time
    layers = list(config.direction_layers) if config.direction_layers is not None else list(range(n_layers))
    layers = sorted(set(layers) | {layer} | {s.layer for s in resolved})
    context = harmful[0][:, :start]  # the few-shot chat context every prompt starts with
    report.direction, directions = direction_effects(model, harmful, harmless, metric, layers, config.max_new_tokens,
                                                     context=context, baseline=baseline)
    for site, sae in resolved.items():
        report.direction.aligned[site.hook_name] = aligned_latents(
            model, sae, site, directions[layers.index(site.layer)], harmless, metric, config.aligned_ks,
            config.max_new_tokens, context, direction_effect=_known_addition(report.direction, site))
    clock["direction"] = time.perf_counter() - start_time - sum(clock.values())
    _curves(model, resolved, harmful, harmless, metric, start, layer, directions[layers.index(layer)], config,
            report, progress)
    clock["curves"] = time.perf_counter() - start_time - sum(clock.values())
    report.dynamic = dynamic_table(model, suite, resolved, [(harmful[i], harmless[i]) for i in report.pairs_used],
                                   metric, start, config, prefix)
    clock["dynamic"] = time.perf_counter() - start_time - sum(clock.values())
    report.seconds = {k: round(v, 1) for k, v in clock.items()}
    return report


def _known_addition(direction: Any, site: Site) -> dict[str, float] | None:
    """The direction's own addition at `site`, when the direction stage already generated under it
    (it adds at `resid_pre` of its layer and rates the best or only layer)."""
    i = direction.layers.index(site.layer)
    if site.kind != "resid_pre" or site.layer not in direction.added_rates or direction.added_score[i] is None:
        return None
    return {"score": direction.added_score[i], "refusal_rate": direction.added_rates[site.layer]}


def _pair_tokens(model: Any, suite: SafetySuite) -> tuple[list[Tensor], list[Tensor]]:
    harmful = tokenize_chat(model, suite, [h for h, _ in suite.pairs])
    harmless = tokenize_chat(model, suite, [s for _, s in suite.pairs])
    for (h, s), a, b in zip(suite.pairs, harmful, harmless):
        if a.shape != b.shape:
            raise PatchingError(f"pair ({h!r}, {s!r}) formats to {a.shape[1]} vs {b.shape[1]} tokens; pairs must match")
    return harmful, harmless


def _rates(model: Any, suite: SafetySuite, harmful: list[Tensor], harmless: list[Tensor], metric: RefusalScore,
           config: SafetyConfig, report: SafetyReport, prefix: SharedPrefix) -> dict[str, tuple[Tensor, float]]:
    """Greedy refusal rates per prompt set; each pair's span; the pairs that clear the threshold.
    Returns the harmful and harmless prompts' scores and rates (the direction stage's baseline)."""
    sets = {"harmful": harmful, "harmless": harmless,
            "jailbreak": tokenize_chat(model, suite, suite.jailbreaks()),
            "control": tokenize_chat(model, suite, list(suite.controls))}
    scores = {}
    report.generations = {}
    for name, prompts in sets.items():  # harmful and harmless: their scores come from the same pass
        if name in ("harmful", "harmless"):
            report.generations[name], scores[name] = greedy_scored(model, prompts, config.max_new_tokens, metric,
                                                                   prefix=prefix, pad=True)
        else:
            report.generations[name] = greedy_texts(model, prompts, config.max_new_tokens, prefix=prefix, pad=True)
    report.refusal_rates = {name: refusal_rate(texts) for name, texts in report.generations.items()}
    spans = scores["harmful"] - scores["harmless"]
    report.spans = spans.tolist()
    kept = pairs_clearing(report.spans, config.span_threshold)
    kept.sort(key=lambda i: -report.spans[i])
    report.pairs_used = sorted(kept[: config.max_pairs])
    return {name: (scores[name], report.refusal_rates[name]) for name in ("harmful", "harmless")}


def _curves(model: Any, saes: dict[Site, Any], harmful: list[Tensor], harmless: list[Tensor], metric: RefusalScore,
            start: int, layer: int, direction: Tensor, config: SafetyConfig, report: SafetyReport,
            progress: bool) -> None:
    # Every prompt opens with the same few-shot context (228 of 243 tokens in the default suite) and
    # nothing is patched before `start`: the context's keys and values are computed once and each
    # pair's forward and backward passes run only its query.
    with tl_compat.bound_prefix(model, harmful[0][:, :start]):
        per_pair = [pair_curves(model, saes, harmful[i][:, start:], harmless[i][:, start:], metric, 0, layer,
                                config.percents, direction)
                    for i in tqdm(report.pairs_used, desc="safety pairs", disable=not progress, leave=False)]
    report.curves = collect_curves(per_pair, report.pairs_used, config.percents, tl_compat.d_model(model))

