"""The refusal direction (Arditi et al. 2024, "Refusal in language models is mediated by a single
direction"): the difference of mean residual streams between harmful and harmless prompts at the
last prompt token, at each layer.

- Ablation, on harmful prompts: the direction's component is projected out of the residual stream
  entering every block and leaving the last, at every position (section 2.4, directional ablation).
- Addition, on harmless prompts: the (unnormalised) direction is added to the residual stream
  entering its own layer, at every position (section 2.4, activation addition).
- Which SAE latents align with it (cosine of decoder rows), and whether adding the Top-1 / Top-K
  aligned decoder directions, scaled to the direction's norm, at the SAE's site reproduces the
  direction's addition there.

Every prompt of the suite starts with the same few-shot chat context (most of its tokens). Given
it (`context`), each intervention runs it once, under that intervention, and the prompts reuse its
keys and values: the same computation as running every prompt whole, at a fraction of the cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from patching.errors import PatchingError
from patching.model import tl_compat
from patching.model.sites import Site
from patching.safety.score import RefusalScore, greedy_scored, greedy_texts, refusal_rate, refusal_scores
from patching.splice.generate import Interventions, SharedPrefix, Step, intervening


ZERO_DIRECTION = 1e-6
"""A layer's direction counts as zero below this fraction of the largest layer's norm."""


def refusal_directions(model: Any, harmful: Sequence[Tensor], harmless: Sequence[Tensor],
                       layers: Sequence[int]) -> Tensor:
    """`(len(layers), d_model)`: mean `resid_pre` at the last token over `harmful` minus over `harmless`."""
    return last_token_means(model, harmful, layers) - last_token_means(model, harmless, layers)


def last_token_means(model: Any, prompts: Sequence[Tensor], layers: Sequence[int]) -> Tensor:
    """`(len(layers), d_model)`: mean over prompts of `resid_pre` at each prompt's last token (float64)."""
    names = [Site(layer, "resid_pre").hook_name for layer in layers]
    total = torch.zeros(len(layers), tl_compat.d_model(model), dtype=torch.float64)
    by_length: dict[int, list[int]] = {}
    for i, row in enumerate(prompts):
        by_length.setdefault(row.shape[-1], []).append(i)
    with torch.inference_mode():
        for indices in by_length.values():
            batch = torch.cat([prompts[i].reshape(1, -1) for i in indices])
            acts = tl_compat.run_to_hooks(model, batch, names, max(layers))
            total += torch.stack([acts[name][:, -1].double().sum(0).cpu() for name in names])
    return total / len(prompts)


def ablation(model: Any, direction: Tensor) -> Interventions:
    """Project `direction` out of the residual stream entering every block and leaving the last."""
    unit = direction / direction.norm()
    n = tl_compat.n_layers(model)
    sites = [Site(layer, "resid_pre") for layer in range(n)] + [Site(n - 1, "resid_post")]

    def project(x: Tensor, step: Step) -> Tensor:
        u = unit.to(x.dtype).to(x.device)
        return x - (x @ u)[..., None] * u

    return Interventions(hooks={site: project for site in sites})


def addition(site: Site, vector: Tensor) -> Interventions:
    """Add `vector` to the activation at `site` (e.g. the residual stream entering a layer), at every position."""

    def add(x: Tensor, step: Step) -> Tensor:
        return x + vector.to(x.dtype).to(x.device)

    return Interventions(hooks={site: add})


@dataclass
class DirectionReport:
    """What the refusal direction does, layer by layer, and what aligned SAE latents do."""

    layers: list[int]
    """Layers whose direction was tried."""
    norms: list[float]
    """The direction's norm at each layer."""
    harmful_score: float
    """Mean refusal score on harmful prompts, unchanged model."""
    harmless_score: float
    """Mean refusal score on harmless prompts, unchanged model."""
    ablated_score: list[float | None]
    """Per layer: mean refusal score on harmful prompts with that layer's direction ablated; None
    where the direction is zero (no ablation is defined: at layer 0 every prompt's last token is
    the same chat-template token and nothing has mixed into it yet)."""
    added_score: list[float | None]
    """Per layer: mean refusal score on harmless prompts with the direction added at its layer
    (None where the direction is zero)."""
    best_layer: int | None = None
    """The layer whose direction moves the two scores most (ablation drop + addition rise)."""
    rates: dict[str, float] = field(default_factory=dict)
    """Greedy refusal rates at the best layer: harmful, harmful ablated, harmless, harmless added."""
    aligned: dict[str, Any] = field(default_factory=dict)
    """SAE latents by decoder cosine with the direction at the SAE's layer, and steering with them."""
    added_rates: dict[int, float] = field(default_factory=dict)
    """Harmless refusal rate with the direction added, per layer where it was generated (the best
    layer, or the only one)."""

    def summary(self) -> dict[str, Any]:
        return {"layers": self.layers, "norms": self.norms, "harmful_score": self.harmful_score,
                "harmless_score": self.harmless_score, "ablated_score": self.ablated_score,
                "added_score": self.added_score, "best_layer": self.best_layer, "rates": self.rates,
                "aligned": self.aligned}


@dataclass(frozen=True)
class Runner:
    """Refusal scores and greedy refusal rates under one prompt-independent intervention, the
    shared `context` (if any) run once per intervention (module docstring)."""

    model: Any
    context: Tensor | None = None
    """The few-shot tokens every prompt starts with, `(1, n)`; None runs every prompt whole."""

    def prefix(self, spec: Interventions | None) -> SharedPrefix | None:
        if self.context is None:
            return None
        if spec is None:
            return SharedPrefix.of(self.model, self.context)
        with intervening(self.model, spec):
            return SharedPrefix.of(self.model, self.context)

    # The interventions here (ablation, addition) act on every position alike, so prompts of
    # different lengths share one padded batch after the context (`prompt_batches`).
    def scores(self, prompts: list[Tensor], metric: RefusalScore, spec: Interventions | None = None) -> Tensor:
        return refusal_scores(self.model, prompts, metric, None if spec is None else (lambda _: spec),
                              prefix=self.prefix(spec), pad=True)

    def rate(self, prompts: list[Tensor], max_new_tokens: int, spec: Interventions | None = None) -> float:
        build = None if spec is None else (lambda _: spec)
        return refusal_rate(greedy_texts(self.model, prompts, max_new_tokens, build, prefix=self.prefix(spec), pad=True))

    def score_and_rate(self, prompts: list[Tensor], metric: RefusalScore, max_new_tokens: int,
                       spec: Interventions | None = None) -> tuple[Tensor, float]:
        """`scores` and `rate` from one generation pass (the score is its first step)."""
        build = None if spec is None else (lambda _: spec)
        texts, scores = greedy_scored(self.model, prompts, max_new_tokens, metric, build, prefix=self.prefix(spec),
                                      pad=True)
        return scores, refusal_rate(texts)


def direction_effects(model: Any, harmful: list[Tensor], harmless: list[Tensor], metric: RefusalScore,
                      layers: Sequence[int], max_new_tokens: int, context: Tensor | None = None,
                      baseline: dict[str, tuple[Tensor, float]] | None = None) -> tuple[DirectionReport, Tensor]:
    """Scores with each layer's direction ablated (harmful) and added (harmless); greedy refusal
    rates at the best layer. Returns the report and the directions `(len(layers), d_model)`.
    `baseline`: the unchanged model's `{"harmful": (scores, rate), "harmless": (scores, rate)}` on
    these prompts with these settings, when already measured (not run again)."""
    run = Runner(model, context)
    if context is None:
        directions = refusal_directions(model, harmful, harmless, layers).float()
    else:  # the means read each prompt's last token: run the queries after the context's cache
        n = context.shape[1]
        if not all(torch.equal(p.reshape(1, -1)[:, :n], context.reshape(1, -1)) for p in (*harmful, *harmless)):
            raise PatchingError("every prompt must start with the given context")
        with tl_compat.bound_prefix(model, context):
            directions = refusal_directions(model, [p.reshape(1, -1)[:, n:] for p in harmful],
                                            [p.reshape(1, -1)[:, n:] for p in harmless], layers).float()
    if baseline is None:
        baseline = {name: run.score_and_rate(p, metric, max_new_tokens) for name, p in (("harmful", harmful),
                                                                                      ("harmless", harmless))}
    (scores_h, rate_h), (scores_s, rate_s) = baseline["harmful"], baseline["harmless"]
    base_h, base_s = scores_h.mean(), scores_s.mean()
    norms = directions.norm(dim=1)
    defined = [i for i in range(len(layers)) if norms[i] > ZERO_DIRECTION * norms.max()]
    if not defined:
        raise PatchingError(f"the harmful and harmless prompts give the same mean residual at every layer {list(layers)}: "
                            "there is no refusal direction to ablate")
    ablated: list[float | None] = [None] * len(layers)
    added: list[float | None] = [None] * len(layers)
    gains: dict[int, float] = {}  # ablation's drop plus addition's rise, per layer with a direction
    specs: dict[int, tuple[Interventions, Interventions]] = {}
    rates: dict[int, tuple[float, float]] = {}  # with a single layer its rates come with its scores
    for i in defined:
        specs[i] = (ablation(model, directions[i]), addition(Site(layers[i], "resid_pre"), directions[i]))
        if len(defined) == 1:
            (a_scores, a_rate), (b_scores, b_rate) = (run.score_and_rate(p, metric, max_new_tokens, spec)
                                                      for p, spec in ((harmful, specs[i][0]), (harmless, specs[i][1])))
            rates[i] = (a_rate, b_rate)
        else:
            a_scores, b_scores = run.scores(harmful, metric, specs[i][0]), run.scores(harmless, metric, specs[i][1])
        a, b = float(a_scores.mean()), float(b_scores.mean())
        ablated[i], added[i], gains[i] = a, b, (float(base_h) - a) + (b - float(base_s))
    report = DirectionReport(list(layers), norms.tolist(), float(base_h), float(base_s), ablated, added)
    report.added_rates = {layers[i]: rates[i][1] for i in rates}
    best = max(gains, key=gains.__getitem__)
    report.best_layer = layers[best]
    if best not in rates:
        rates[best] = (run.rate(harmful, max_new_tokens, specs[best][0]), run.rate(harmless, max_new_tokens, specs[best][1]))
        report.added_rates[layers[best]] = rates[best][1]
    report.rates = {"harmful": rate_h, "harmful_ablated": rates[best][0], "harmless": rate_s,
                    "harmless_added": rates[best][1]}
    return report, directions


def aligned_latents(model: Any, sae: Any, site: Site, direction: Tensor, harmless: list[Tensor],
                    metric: RefusalScore, ks: Sequence[int], max_new_tokens: int,
                    context: Tensor | None = None, direction_effect: dict[str, float] | None = None) -> dict[str, Any]:
    """Latents whose decoder rows align with `direction` (the direction at the SAE's layer), and
    the refusal score/rate on harmless prompts when adding the direction itself versus the Top-k
    aligned decoder directions (unit rows summed, scaled to the direction's norm) at `site`.
    `direction_effect`: the direction's own `{"score", "refusal_rate"}` there, when already measured
    (`direction_effects` adds it at `resid_pre` of its layer)."""
    with torch.no_grad():
        rows = sae.W_dec.detach().float().cpu()
        cosine = (rows @ direction.float()) / (rows.norm(dim=1) * direction.norm()).clamp(min=1e-12)
    order = torch.argsort(cosine, descending=True, stable=True)
    out: dict[str, Any] = {"site": site.hook_name, "top_latents": order[:10].tolist(),
                           "top_cosines": cosine[order[:10]].tolist()}

    run = Runner(model, context)

    def effect(vector: Tensor) -> dict[str, float]:
        scores, rate = run.score_and_rate(harmless, metric, max_new_tokens, addition(site, vector))
        return {"score": float(scores.mean()), "refusal_rate": rate}

    out["direction"] = direction_effect if direction_effect is not None else effect(direction)
    for k in ks:
        unit_rows = rows[order[:k]] / rows[order[:k]].norm(dim=1, keepdim=True)
        vector = unit_rows.sum(0)
        out[f"top_{k}"] = effect(vector / vector.norm() * direction.norm())
    return out

