"""Self-repair (the Hydra effect; McGrath et al. 2023, "The Hydra Effect: Emergent Self-repair in
Language Model Computations"): a component's direct effect on the metric against its total effect.

- direct effect: the change in the metric carried by the component's own output alone, read
  straight through the unembedding with the final norm's scale frozen at the base run's
  (`tl_compat.frozen_final_readout`). The readout is linear, so for a `LogitDiff` the direct effect
  is the metric of the change's logits alone. Any other `Metric` (one position, int `readout`) is
  evaluated at the base run's logits plus that change, M(base + Δ) − M(base): the same number for a
  linear metric, and for a non-linear one (a log-probability) the metric's change with only the
  component's direct path moved. For a non-linear metric direct effects of several components do
  not add up, so read compensation as per-component changes, not as shares of a sum. Metrics
  that read every position (`readout=None`) or need reference runs (`bind`, e.g. `KLFromClean`)
  are refused: one prompt has one read position and no clean/corrupted pair;
- total effect: the metric's change when the component is ablated (zero, the mean over a corpus, or
  resampled from the corrupted run) and everything downstream recomputes.
Direct − total is what the rest of the network restored; the downstream components whose own
direct effects moved by the ablation are the ones that did it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from patching.errors import PatchingError
from patching.figures import subplots
from patching.model import tl_compat
from patching.model.checks import check_token_batch
from patching.model.provenance import provenance
from patching.model.sites import Site
from patching.saved import SavedResult
from patching.sweep.objectives import BindsToRuns, CallableMetric, LogitDiff, Metric, as_metric
from sae.deprecation import renamed_keywords, warn_deprecated

Ablation = Literal["zero", "mean", "resample"]


@dataclass(frozen=True)
class Component:
    """A component whose output is a sum term of the residual stream."""

    layer: int
    """Block index."""
    kind: Literal["attn", "mlp", "head"]
    """A whole attention layer, a whole MLP, or one head."""
    head: int | None = None
    """The head, for `kind="head"`."""

    def __post_init__(self) -> None:
        if self.kind not in ("attn", "mlp", "head"):
            raise PatchingError(f"Component.kind must be 'attn', 'mlp' or 'head', got {self.kind!r}")
        if (self.kind == "head") != (self.head is not None):
            raise PatchingError(f"Component: head= is needed for kind='head' and only then (got kind={self.kind!r}, "
                                f"head={self.head!r})")

    @property
    def site(self) -> Site:
        """Where the output is read and ablated: the head's `z` (its write is z @ W_O) or the layer's output."""
        if self.kind == "head":
            return Site(self.layer, "head_out", head=self.head)
        return Site(self.layer, "attn_out" if self.kind == "attn" else "mlp_out")

    @property
    def order(self) -> tuple[int, int]:
        """Position in the forward pass: a block's MLP reads its attention's output."""
        return (self.layer, 1 if self.kind == "mlp" else 0)

    def label(self) -> str:
        return f"L{self.layer}H{self.head}" if self.kind == "head" else f"{self.kind.upper()}{self.layer}"


@dataclass(frozen=True)
class RepairResult(SavedResult):
    """Direct and total effects of each component, and who compensated."""

    components: list[Component]
    """The components, in order."""
    direct: Tensor
    """Direct effect of ablating each component: base metric minus the metric with its direct
    contribution replaced by the ablated one, (n,)."""
    total: Tensor
    """Total effect: base metric minus the metric of the ablated run, (n,)."""
    compensation: Tensor
    """(n, n): row i, column j: how much component j's direct contribution to the metric rose when
    component i was ablated (downstream components only; 0 elsewhere)."""
    ablation: str
    """How components were ablated."""
    provenance: dict[str, Any] = field(default_factory=dict, compare=False)
    """What produced it (`patching.model.provenance.provenance`)."""

    @property
    def repair(self) -> Tensor:
        """direct − total: the part of the direct effect the rest of the network restored."""
        return self.direct - self.total

    def table(self) -> Any:
        """Deprecated name of `to_dataframe`."""
        warn_deprecated("RepairResult.table()", "to_dataframe()")
        return self.to_dataframe()

    def to_dataframe(self) -> Any:
        """A pandas DataFrame: component, direct, total, repair, top compensating component."""
        import pandas as pd

        top = self.compensation.argmax(1)
        return pd.DataFrame({
            "component": [c.label() for c in self.components], "direct": self.direct.tolist(),
            "total": self.total.tolist(), "repair": self.repair.tolist(),
            "top_compensator": [self.components[j].label() if self.compensation[i, j] > 0 else ""
                                for i, j in enumerate(top.tolist())],
            "top_compensation": self.compensation.max(1).values.clamp(min=0).tolist(),
        })

    @renamed_keywords(top_k="k")
    def plot(self, path: str | Path, *, k: int = 3) -> Path:
        """Direct against total per component, and the compensation by downstream components for the
        `k` components with the largest direct effects (`top_k=`: deprecated name)."""
        n = len(self.components)
        fig, (left, right) = subplots(1, 2, figsize=(max(8, n * 0.3) + 6, 4))
        x = torch.arange(n).float()
        left.bar(x - 0.2, self.direct, width=0.4, label="direct")
        left.bar(x + 0.2, self.total, width=0.4, label="total")
        left.set_xticks(x.tolist(), [c.label() for c in self.components], rotation=90, fontsize=6)
        left.set_ylabel(f"effect of {self.ablation} ablation on the metric")
        left.legend()
        for i in self.direct.abs().argsort(descending=True)[:k].tolist():
            right.plot(x, self.compensation[i], marker=".", label=f"{self.components[i].label()} ablated")
        right.set_xticks(x.tolist(), [c.label() for c in self.components], rotation=90, fontsize=6)
        right.set_ylabel("rise in direct effect (compensation)")
        right.legend()
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        return path


def self_repair(model: Any, tokens: Tensor, metric: Metric | Callable[..., Tensor], *, components: Sequence[Component] | None = None,
                ablation: Ablation = "zero", corrupted: Tensor | None = None, corpus: Tensor | None = None) -> RepairResult:
    """Direct and total effects of ablating each component on `tokens` (1, pos), and compensation.

    `ablation`: `zero`; `mean` (the component's output averaged over every position of `corpus`,
    (batch, pos) token ids); `resample` (its output on `corrupted`, same length as `tokens`).
    Components default to every attention layer and MLP. `metric`: a `Metric` with an int
    `readout` (`LogitDiff`, `TokenLogProb`, ...), or a callable on (1, vocab) logits read at the
    last position (`as_metric`); see the module docstring for the direct effect of each."""
    metric = _repair_metric(metric)
    components = _check(model, tokens, metric, components, ablation, corrupted, corpus)
    names = sorted({c.site.hook_name for c in components})
    with torch.inference_mode():
        final, base = tl_compat.run_until_end_with_cache(model, tokens, names)
        base_out = [c.site.select(base[c.site.hook_name])[0] for c in components]  # (pos, width) each
        ablated_values = _ablated_outputs(components, base_out, names, ablation, model, corrupted, corpus)
        base_final = final[0, metric.readout]
        m_base = _metric(metric, tl_compat.readout(model, base_final[None]))
        direct, total = torch.empty(len(components)), torch.empty(len(components))
        compensation = torch.zeros(len(components), len(components))
        for i, comp in enumerate(components):
            value = ablated_values[i]
            # One readout of the change (ablated - base), not two readouts subtracted: under a final
            # logit soft-cap the readout is not linear (tl_compat.frozen_final_readout).
            direct[i] = -_direct(model, metric, _write(model, comp, value - base_out[i]), base_final)
            handle = tl_compat.attach_hook(model, comp.site.hook_name, _setter(comp.site, value))
            try:
                final_i, run_i = tl_compat.run_until_end_with_cache(model, tokens, names)
            finally:
                handle.remove()
            total[i] = m_base - _metric(metric, tl_compat.readout(model, final_i[0, metric.readout][None]))
            for j, other in enumerate(components):
                if other.order > comp.order:  # only components downstream can respond
                    own_out = other.site.select(run_i[other.site.hook_name])[0]
                    compensation[i, j] = _direct(model, metric, _write(model, other, own_out - base_out[j]), base_final)
    record = provenance(model, prompts=[tl_compat.to_string(model, tokens[0])], metric=metric,
                        components=[c.label() for c in components])
    return RepairResult(list(components), direct, total, compensation, ablation, provenance=record)


def _repair_metric(metric: Any) -> Metric:
    """The metric as a `Metric` reading one position; a bare callable reads the last one."""
    if callable(metric) and not isinstance(metric, Metric):
        metric = CallableMetric(metric, readout=-1)
    metric = as_metric(metric)
    if isinstance(metric, BindsToRuns):
        raise PatchingError(f"self_repair cannot take {type(metric).__name__}: it needs reference runs (bind) and "
                            "self_repair has one prompt; use LogitDiff, TokenLogProb, TokenProb or a Metric with an int readout")
    if metric.readout is None:
        raise PatchingError(f"self_repair reads one position: {metric!r} has readout=None (every position); give an int "
                            "readout, e.g. LogitDiff, TokenLogProb, TokenProb or CallableMetric(fn, readout=-1)")
    return metric


def _metric(metric: Metric, logits: Tensor) -> float:
    return float(metric(logits, torch.zeros(1, dtype=torch.long))[0])


def _write(model: Any, comp: Component, output: Tensor) -> Tensor:
    """The component's write to the residual stream from its site's (pos, width) value, (pos, d_model)."""
    if comp.kind == "head":
        return output @ tl_compat.head_out_weight(model, comp.layer)[comp.head]
    return output


def _direct(model: Any, metric: Metric, write: Tensor, base_final: Tensor) -> Tensor:
    """The metric's change when `write` is added to the final residual through the direct path only."""
    pair = torch.zeros(1, dtype=torch.long)
    added = tl_compat.frozen_final_readout(model, write[metric.readout], base_final)[None]
    if isinstance(metric, LogitDiff):  # linear: the readout of the change is the change of the metric
        return metric(added, pair)[0]
    base = tl_compat.readout(model, base_final[None]).float()
    return (metric(base + added.float(), pair) - metric(base, pair))[0]


def _setter(site: Site, value: Tensor):
    def hook(x: Tensor) -> Tensor:
        x = x.clone(memory_format=torch.contiguous_format)
        site.select(x)[:] = value.to(x.dtype)
        return x
    return hook


def _ablated_outputs(components: Sequence[Component], base_out: list[Tensor], names: list[str], ablation: str,
                     model: Any, corrupted: Tensor | None, corpus: Tensor | None) -> list[Tensor]:
    """Per component, the (pos, width) value its site is set to at the base prompt's positions."""
    if ablation == "zero":
        return [torch.zeros_like(out) for out in base_out]
    _, acts = tl_compat.run_until_end_with_cache(model, corrupted if ablation == "resample" else corpus, names)
    values = []
    for comp, out in zip(components, base_out):
        value = comp.site.select(acts[comp.site.hook_name])
        values.append(value[0] if ablation == "resample" else value.mean((0, 1))[None].expand_as(out))
    return values


def _check_metric(metric: Metric, vocab: int, n_pos: int) -> None:
    """Token ids (where the metric names them) one each and in the vocabulary, and a read position
    inside the prompt."""
    kind = type(metric).__name__
    names = ("answer", "wrong") if isinstance(metric, LogitDiff) else ("token",)
    for name, ids in zip(names, metric.token_ids() if hasattr(metric, "token_ids") else []):
        if ids.numel() != 1 or not 0 <= int(ids.reshape(-1)[0]) < vocab:
            raise PatchingError(f"{kind}.{name} must be one token id in [0, {vocab}) for self_repair's one prompt, "
                                f"got {ids.tolist()}")
    position = metric.readout
    if isinstance(position, bool) or not isinstance(position, int) or not -n_pos <= position < n_pos:
        label = "position" if isinstance(metric, LogitDiff) else "readout"
        raise PatchingError(f"{kind}.{label} must be an int in [-{n_pos}, {n_pos}) (the prompt's {n_pos} tokens), "
                            f"got {position!r}")


def _check(model: Any, tokens: Tensor, metric: Any, components: Sequence[Component] | None, ablation: str,
           corrupted: Tensor | None, corpus: Tensor | None) -> list[Component]:
    if ablation not in ("zero", "mean", "resample"):
        raise PatchingError(f"ablation must be 'zero', 'mean' or 'resample', got {ablation!r}")
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.shape[0] != 1:
        raise PatchingError(f"tokens must be (1, pos), got {getattr(tokens, 'shape', tokens)!r}")
    vocab, n_ctx = tl_compat.d_vocab(model), tl_compat.n_ctx(model)
    check_token_batch(tokens, "tokens", vocab, n_ctx=n_ctx)
    for name, extra in (("corrupted", corrupted), ("corpus", corpus)):
        if isinstance(extra, Tensor):
            check_token_batch(extra, name, vocab, n_ctx=n_ctx)
    if ablation == "resample" and (corrupted is None or corrupted.shape != tokens.shape):
        raise PatchingError(f"resample ablation needs corrupted tokens of shape {tuple(tokens.shape)}, "
                            f"got {None if corrupted is None else tuple(corrupted.shape)}")
    if ablation == "mean" and (corpus is None or corpus.ndim != 2 or corpus.numel() == 0):
        raise PatchingError("mean ablation needs a (batch, pos) corpus of token ids")
    _check_metric(metric, vocab, tokens.shape[1])
    if components is not None:
        given, components = components, [] if isinstance(components, (str, Component)) else list(components)
        if not components:
            raise PatchingError(f"components must be a non-empty list of Component values, or None for every "
                                f"attention layer and MLP; got {given!r}")
    if components is None:
        kinds = ["attn"] + (["mlp"] if tl_compat.d_mlp(model) else [])
        components = [Component(layer, kind) for layer in range(tl_compat.n_layers(model)) for kind in kinds]
    components = list(components)
    for comp in components:
        if not isinstance(comp, Component):
            raise PatchingError(f"components must be Component values, got {type(comp).__name__}")
        comp.site.check(model)
    return components
