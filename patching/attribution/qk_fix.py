"""AtP*'s QK fix: attribution for attention queries and keys without linearising the softmax.

Plain attribution patching estimates a query or key node's effect as `Δq · ∂M/∂q`, linear through
the attention softmax; where the softmax saturates its gradient vanishes and a query that moves the
attention from one token to another is scored near zero (Kramár et al. 2024, "AtP*", §3.1.1). The
QK fix recomputes the attention pattern exactly with the patched query (one row of the scores) or
key (one column, in every row after it) and takes the change in attention probabilities against
∂M/∂pattern at the base run: `Σ (pattern' − pattern) · ∂M/∂pattern`. Everything after the pattern is
still linearised; everything up to it is exact, so on a model whose metric is linear in the pattern
(one attention layer read at one position) the estimate equals exact patching.

AtP* (`method="atp*"`) adds GradDrop (§3.2, as `atp_gd` does for latents): for every block ℓ after
a unit's layer, the QK-fixed estimate with ∂M/∂pattern taken while block ℓ's attention and MLP writes
pass no gradient; the score is the mean of their absolute values (a unit in the last layer keeps
|QK fix|). It is unsigned — a ranking robust to cancellation between paths, not an effect size — and
costs one backward pass per block after the first scored layer.

Units are those of `patch_heads` (`kind` `q` or `k`, `by` `all` or `position`, in its order), so the
result lines up with the exact sweep column for column. Key units are key/value heads under
grouped-query attention: a key's change reaches every query head of its group, and the estimate
sums over them. One forward and one backward pass at the base run per pair, plus the two reference
runs; the softmax recomputation is per head and costs no forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from patching.attribution.estimators import drop_block_gradient, frozen_parameters
from patching.configs import resolve_config
from patching.errors import PatchingError
from patching.model import tl_compat, tl_paths
from patching.model.sites import Site
from patching.sweep.engine import RunCache, normalized_effect, readout_logits, reference_metrics
from patching.sweep.objectives import Metric, as_metric
from patching.sweep.pairs import Direction, Prompts, make_pairs
from patching.sweep.patch import check_run_settings, flag_small_spans, provenance_record, run_lengths
from patching.sweep.results import PatchResult
from patching.sweep.units import head_units


@dataclass(frozen=True)
class QKConfig:
    """Settings of `attribute_qk`."""

    kind: Literal["q", "k"] = "q"
    """Query heads (`q`) or key/value heads' keys (`k`)."""
    method: Literal["atp", "atp_qk", "atp*"] = "atp_qk"
    """`atp`: `Δ · ∂M/∂(q or k)`; `atp_qk`: the pattern recomputed exactly (the QK fix); `atp*`: the
    QK fix with GradDrop (unsigned)."""
    by: Literal["all", "position"] = "position"
    """One unit per head at every position (`all`) or per head and position (`position`)."""
    layers: tuple[int, ...] | None = None
    """Layers to score; None for every layer."""
    direction: Direction = "denoise"
    """`denoise`: base = corrupted, source = clean; `noise`: the reverse."""

    def __post_init__(self) -> None:
        for name, value, allowed in (("kind", self.kind, ("q", "k")), ("method", self.method, ("atp", "atp_qk", "atp*")),
                                     ("by", self.by, ("all", "position")), ("direction", self.direction, ("denoise", "noise"))):
            if value not in allowed:
                raise PatchingError(f"QKConfig.{name} must be one of {allowed}, got {value!r}")


def attribute_qk(model: Any, clean: Prompts, corrupted: Prompts, metric: Any, *, config: QKConfig | None = None,
                 **overrides: Any) -> PatchResult:
    """Estimate the patching effect of every query (or key) head, per position or at all positions;
    see the module docstring. `result.metric` is M_base + estimate, in `patch_heads`'s unit order."""
    config = resolve_config(QKConfig, config, overrides)
    metric = as_metric(metric)
    if metric.readout is None:
        raise PatchingError("attribution needs a metric that reads one position (e.g. LogitDiff(position=-1))")
    reason = tl_paths.unsupported_for_qk_fix(model)
    if reason is not None and config.method != "atp":
        raise PatchingError(f"the QK fix cannot run on {tl_compat.model_name(model)}: {reason}")
    pairs = make_pairs(model, clean, corrupted, direction=config.direction, align=None)
    check_run_settings(model, metric, len(pairs), lengths=run_lengths(pairs))
    n_layers = tl_compat.n_layers(model)
    layers = list(range(n_layers)) if config.layers is None else [Site(layer).check(model).layer for layer in config.layers]
    shortest = min(pair.n_base for pair in pairs)
    units = head_units(model, config.kind, layers, config.by, range(shortest))
    names = [Site(0, "resid_pre").hook_name] + [name for layer in layers for name in _names(model, layer).values()]
    estimates = torch.zeros(len(pairs), len(units))
    with frozen_parameters(model):
        with torch.no_grad():
            runs = [tuple(_cached_run(model, tokens, names, metric.readout) for tokens in (p.base, p.source)) for p in pairs]
        metric, m_clean, m_corrupted = reference_metrics(metric, [(RunCache(b[0]), RunCache(s[0])) for b, s in runs],
                                                         config.direction)
        for i, ((_, base), (_, source)) in enumerate(runs):
            if config.method == "atp*":
                estimates[i] = _grad_drop_scores(model, config, metric, i, base, source, layers, shortest)
            else:
                grads = base_gradients(model, metric, i, base, layers)
                estimates[i] = _unit_scores(config, [_layer_scores(model, config, layer, base, source, grads)[:, :shortest]
                                                     for layer in layers])
    m_base = m_corrupted if config.direction == "denoise" else m_clean
    values = m_base[:, None] + estimates
    effect = normalized_effect(values, m_clean, m_corrupted, config.direction)
    extra = {"unit": f"head_{config.kind}_{config.by}", "method": config.method, "layers": layers}
    result = PatchResult(units=units, effect=effect.abs() if config.method == "atp*" else effect,
                         metric=values, metric_clean=m_clean, metric_corrupted=m_corrupted, direction=config.direction,
                         method=config.method, base_tokens=[tl_compat.to_str_tokens(model, p.base[0]) for p in pairs],
                         provenance=provenance_record(model, pairs, metric, config.direction, extra, 0))
    flag_small_spans(result)
    return result


def _unit_scores(config: QKConfig, per_layer: list[Tensor]) -> Tensor:
    """Flatten (heads, pos) scores per layer into `patch_heads`'s unit order."""
    scores = torch.stack(per_layer)  # (layers, heads, pos)
    return (scores.sum(-1) if config.by == "all" else scores.transpose(1, 2)).flatten()


def _grad_drop_scores(model: Any, config: QKConfig, metric: Metric, pair_index: int, base: dict[str, Tensor],
                      source: dict[str, Tensor], layers: list[int], shortest: int) -> Tensor:
    """AtP*: per unit, the mean over blocks ℓ after its layer of |QK fix with block ℓ's gradient dropped|."""
    n_heads = tl_compat.n_heads(model) if config.kind == "q" else tl_compat.n_kv_heads(model)

    def scores(chosen: list[int], grads: dict[str, Tensor]) -> Tensor:
        """|unit scores| of the `chosen` layers' units, zero for the rest."""
        return _unit_scores(config, [_layer_scores(model, config, layer, base, source, grads)[:, :shortest]
                                     if layer in chosen else torch.zeros(n_heads, shortest) for layer in layers]).abs()

    total = torch.zeros(len(layers) * n_heads * (1 if config.by == "all" else shortest))
    counts = torch.zeros(len(layers))
    for drop in range(min(layers) + 1, tl_compat.n_layers(model)):
        before = [layer for layer in layers if layer < drop]
        with drop_block_gradient(model, drop):
            total += scores(before, base_gradients(model, metric, pair_index, base, before))
        counts += torch.tensor([float(layer < drop) for layer in layers])
    last = [layer for layer, count in zip(layers, counts.tolist()) if count == 0]
    if last:  # units with no block after them: plain |QK fix|
        total += scores(last, base_gradients(model, metric, pair_index, base, last))
        counts[counts == 0] = 1
    return total / counts.repeat_interleave(len(total) // len(layers))  # units are layer-major


def _names(model: Any, layer: int) -> dict[str, str]:
    """The raw q/k (what a patch replaces), the q/k entering the scores, the scores and the pattern."""
    scored = tl_paths.attention_hook_names(model, layer)
    return {"raw_q": Site(layer, "q").hook_name, "raw_k": Site(layer, "k").hook_name,
            "q": scored["q"], "k": scored["k"], "scores": scored["scores"], "pattern": scored["pattern"]}


def _cached_run(model: Any, tokens: Tensor, names: list[str], readout: int) -> tuple[Tensor, dict[str, Tensor]]:
    final, acts = tl_compat.run_until_end_with_cache(model, tokens, list(dict.fromkeys(names)))
    return readout_logits(model, final, readout)[0], {name: act[0] for name, act in acts.items()}


def base_gradients(model: Any, metric: Metric, pair_index: int, base: dict[str, Tensor],
                    layers: list[int]) -> dict[str, Tensor]:
    """∂M/∂(raw q, raw k, pattern) of each layer at the base run, one forward and one backward."""
    names = [_names(model, layer)[key] for layer in layers for key in ("raw_q", "raw_k", "pattern")]
    captured: dict[str, Tensor] = {}

    def capture(name: str) -> Any:
        def hook(x: Tensor) -> Tensor:
            captured[name] = x
            return x
        return hook

    with torch.enable_grad(), tl_compat.hooks(model, [(name, capture(name)) for name in names]):
        resid = base[Site(0, "resid_pre").hook_name]
        final = tl_compat.run_blocks(model, resid[None].clone().requires_grad_(True), 0)
        value = metric(readout_logits(model, final, metric.readout), torch.tensor([pair_index]))
        grads = torch.autograd.grad(value.sum(), [captured[name] for name in names], allow_unused=True)
    return {name: (torch.zeros_like(captured[name]) if g is None else g)[0] for name, g in zip(names, grads)}


def _layer_scores(model: Any, config: QKConfig, layer: int, base: dict[str, Tensor], source: dict[str, Tensor],
                  grads: dict[str, Tensor]) -> Tensor:
    """(heads of `kind`, pos) estimates for one layer: per query position (q) or key position (k)."""
    names = _names(model, layer)
    raw = names["raw_q"] if config.kind == "q" else names["raw_k"]
    if config.method == "atp":
        return ((source[raw] - base[raw]) * grads[raw]).sum(-1).T  # (pos, heads, d_head) -> (heads, pos)
    group = tl_compat.n_heads(model) // tl_compat.n_kv_heads(model)  # query heads per key/value head
    scale = tl_paths.attention_scale(model, layer)
    q, k, scores = base[names["q"]], base[names["k"]], base[names["scores"]]  # (pos, heads, d), (pos, kv, d), (heads, T, S)
    pattern, grad = base[names["pattern"]], grads[names["pattern"]]
    causal = torch.isfinite(scores[0])  # (T, S): entries the mask leaves
    out = []
    for h in range(q.shape[1] if config.kind == "q" else k.shape[1]):
        if config.kind == "q":
            shift = ((source[names["q"]][:, h] - q[:, h]) @ k[:, h // group].T / scale) * causal  # (T, S)
            out.append(((torch.softmax(scores[h] + shift, -1) - pattern[h]) * grad[h]).sum(-1))
        else:
            heads = range(h * group, (h + 1) * group)
            out.append(sum(_key_scores(scores[g], pattern[g], grad[g], q[:, g], source[names["k"]][:, h] - k[:, h],
                                       scale, causal, config.by) for g in heads))
    return torch.stack(out)


def _key_scores(scores: Tensor, pattern: Tensor, grad: Tensor, q: Tensor, dk: Tensor, scale: float, causal: Tensor,
                by: str) -> Tensor:
    """Per key position s, Σ (pattern' − pattern) · grad with only key s patched (every row after s
    recomputed), (S,); with `by="all"` every key patched at once, in the first entry."""
    shift = (q @ dk.T / scale) * causal  # (T, S): row t, column s is q_t · Δk_s
    if by == "all":
        total = ((torch.softmax(scores + shift, -1) - pattern) * grad).sum()
        return torch.cat([total[None], torch.zeros(scores.shape[1] - 1, dtype=total.dtype)])
    n = scores.shape[1]
    patched = scores[None].repeat(n, 1, 1)  # (S, T, S): copy s has column s shifted
    index = torch.arange(n)
    patched[index, :, index] += shift.T
    return ((torch.softmax(patched, -1) - pattern[None]) * grad[None]).sum((1, 2))
