"""The error share on a fixed, named set of prompt pairs (issue 26 §4): how much of each pair's exact
denoising effect at an SAE's site the dictionary's latents carry, and how much its error node does.

The set has three groups, each with the metric its finding is read with:

- `factual`: Eiffel Tower -> Colosseum, logit difference " Paris" - " Rome" (the demo's sweep);
- `ioi`: indirect-object identification pairs (Wang et al. 2023, "Interpretability in the Wild"),
  the second mention of the subject swapped so that the answer flips ("... John gave a drink to"
  -> " Mary" / "... Mary gave a drink to" -> " John"), logit difference of the two names;
- `safety`: the safety suite's (harmful, harmless) requests in its few-shot chat format, the
  refusal score at the first assistant position (`RefusalScore`), as the safety curves read them.

Each pair runs through `error_share` (three exact patches at every position: latents with the
error held corrupted, the error node alone, both). A pair counts only if its span, M(clean) -
M(corrupted), clears `span_threshold` (the safety curves' rule, `SafetyConfig.span_threshold`):
a normalised effect over a near-zero span is noise. Medians per group are over the counted pairs
(the mean of the middle two for an even count). The set lives in the safety room because its
safety group is the suite read in the suite's own format and metric.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from patching.configs import resolve_config
from patching.errors import PatchingError
from patching.figures import subplots
from patching.model import tl_compat
from patching.model.provenance import provenance
from patching.safety.prompts import SafetySuite
from patching.safety.score import RefusalScore, tokenize_chat
from patching.saved import SavedResult
from patching.splice.collect import resolve_site
from patching.splice.splicer import SpliceChecks
from patching.sweep.engine import DEFAULT_MEMORY_MB
from patching.sweep.error_share import SHARES, error_share
from patching.sweep.objectives import LogitDiff

PairGroup = Literal["factual", "ioi", "safety"]
PAIR_GROUPS: tuple[str, ...] = get_args(PairGroup)


@dataclass(frozen=True)
class NamedPair:
    """One pair of the set: clean shows the behaviour, corrupted does not, same token length."""

    name: str
    """Stable name, the key of its figures in the registry (e.g. `eiffel`, `ioi-0`, `safety-3`)."""
    group: PairGroup
    """Which finding it belongs to (module docstring)."""
    clean: str
    """The clean prompt (a safety pair: the harmful request, before chat formatting)."""
    corrupted: str
    """The corrupted prompt (a safety pair: the harmless twin)."""
    answer: str | None = None
    """Single-token text of the clean answer; None for a safety pair (read by the refusal score)."""
    wrong: str | None = None
    """Single-token text of the corrupted answer; None for a safety pair."""

    def __post_init__(self) -> None:
        if self.group not in PAIR_GROUPS:
            raise PatchingError(f"NamedPair.group must be one of {PAIR_GROUPS}, got {self.group!r}")
        if not all(isinstance(t, str) and t for t in (self.name, self.clean, self.corrupted)):
            raise PatchingError(f"NamedPair needs a non-empty name, clean and corrupted prompt, got {self!r:.120}")
        if (self.group == "safety") != (self.answer is None and self.wrong is None):
            raise PatchingError(f"NamedPair {self.name!r}: a safety pair has no answer tokens (the refusal score "
                                f"reads it) and every other pair names both, got {self.answer!r}, {self.wrong!r}")


FACTUAL_PAIRS: tuple[NamedPair, ...] = (
    NamedPair("eiffel", "factual", "The Eiffel Tower is located in the city of",
              "The Colosseum is located in the city of", " Paris", " Rome"),
)
"""The demo's factual pair (docs/results.md measures release 1 on it)."""

IOI_TEMPLATES: tuple[tuple[str, str, str], ...] = (
    ("When {a} and {b} went to the store, {s} gave a drink to", "Mary", "John"),
    ("When {a} and {b} went to the park, {s} gave a ball to", "Tom", "James"),
    ("After {a} and {b} had lunch at the cafe, {s} handed the bill to", "Sarah", "David"),
    ("Then, {a} and {b} were working at the office. {s} passed a note to", "Emma", "Michael"),
    ("While {a} and {b} were cooking dinner, {s} gave a spoon to", "Anna", "Paul"),
)
"""IOI templates (Wang et al. 2023): the indirect object {a}, the subject {b} named again as {s}."""

IOI_PAIRS: tuple[NamedPair, ...] = tuple(
    NamedPair(f"ioi-{i}", "ioi", template.format(a=a, b=b, s=b), template.format(a=a, b=b, s=a), f" {a}", f" {b}")
    for i, (template, a, b) in enumerate(IOI_TEMPLATES))
"""Clean: the subject repeats, the answer is the other name; corrupted: the other name repeats."""


def named_pairs(groups: Sequence[str] = PAIR_GROUPS, suite: SafetySuite | None = None) -> tuple[NamedPair, ...]:
    """The named set's pairs of `groups`, the safety group from `suite` (the default suite if None)."""
    unknown = sorted(set(groups) - set(PAIR_GROUPS))
    if unknown or not groups:
        raise PatchingError(f"pair groups must be a non-empty subset of {PAIR_GROUPS}, got {list(groups)}")
    suite = SafetySuite() if suite is None else suite
    safety = tuple(NamedPair(f"safety-{i}", "safety", harmful, harmless) for i, (harmful, harmless) in enumerate(suite.pairs))
    by_group = {"factual": FACTUAL_PAIRS, "ioi": IOI_PAIRS, "safety": safety}
    return tuple(pair for group in PAIR_GROUPS if group in groups for pair in by_group[group])


@dataclass(frozen=True)
class PairSetConfig:
    """Settings of `pair_set_error_share`."""

    span_threshold: float = 1.0
    """A pair counts only if M(clean) - M(corrupted) is at least this (the safety curves' default)."""
    suite: SafetySuite | None = None
    """The chat context safety pairs are formatted in; None: the default suite."""
    batch_size: int | None = None
    """Rows per forward pass of each pair's sweep; None derives it from `memory_mb`."""
    memory_mb: int = DEFAULT_MEMORY_MB
    """Memory budget a sweep derives its batch size from."""
    progress: bool = False
    """Show a progress bar per pair's sweep."""
    checks: SpliceChecks | None = None
    """Splice checks to waive; None waives nothing."""

    def __post_init__(self) -> None:
        threshold = self.span_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < math.inf:
            raise PatchingError(f"PairSetConfig.span_threshold must be a positive finite number, got {threshold!r}")
        if self.suite is not None and not isinstance(self.suite, SafetySuite):
            raise PatchingError(f"PairSetConfig.suite must be a SafetySuite or None, got {type(self.suite).__name__}")
        if not isinstance(self.progress, bool):
            raise PatchingError(f"PairSetConfig.progress must be a bool, got {self.progress!r}")


@dataclass
class PairSetShares(SavedResult):
    """Per named pair: the latents', the error node's and the whole site's share of its denoising
    effect at one SAE site, its span, and whether it cleared the span threshold."""

    site: str
    """Hook name of the SAE's site."""
    names: list[str]
    """Pair names, one per row."""
    groups: list[str]
    """Each pair's group (`PAIR_GROUPS`)."""
    latents: Tensor
    """(pairs,): every latent patched clean at every position, the error node held corrupted."""
    error: Tensor
    """(pairs,): the error node patched clean, every latent held corrupted."""
    total: Tensor
    """(pairs,): both, the site's whole activation (1 up to rounding at a resid_pre site)."""
    metric_clean: Tensor
    """(pairs,): M on the clean prompt."""
    metric_corrupted: Tensor
    """(pairs,): M on the corrupted prompt."""
    span_threshold: float
    """Pairs whose span is below this are reported but left out of the medians."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """What produced it: model, SAE hash, prompts, metrics, library version."""

    @property
    def span(self) -> Tensor:
        """(pairs,): M(clean) - M(corrupted), the denominator of every share."""
        return self.metric_clean - self.metric_corrupted

    @property
    def counted(self) -> Tensor:
        """(pairs,) bool: the span is finite and clears `span_threshold`."""
        return self.span.isfinite() & (self.span >= self.span_threshold)

    def medians(self) -> dict[str, dict[str, Any]]:
        """Per group present: the number of counted pairs and the median of each share over them
        (None where no pair counted)."""
        out: dict[str, dict[str, Any]] = {}
        for group in dict.fromkeys(self.groups):
            rows = [i for i, g in enumerate(self.groups) if g == group and bool(self.counted[i])]
            out[group] = {"n_pairs": sum(g == group for g in self.groups), "n_counted": len(rows),
                          **{name: statistics.median(getattr(self, name)[rows].tolist()) if rows else None
                             for name in SHARES}}
        return out

    def to_dict(self) -> dict[str, Any]:
        """The figures as JSON: site, threshold, medians per group and every pair's row."""
        return {"site": self.site, "span_threshold": self.span_threshold, "median": self.medians(),
                "pairs": {name: row for name, row in zip(self.names, self._rows())}}

    def registry_block(self) -> dict[str, Any]:
        """What a release registry entry records under `error_share` (`to_dict` plus the metric
        each group is read with): the lead's release script writes it for every SAE."""
        return {**self.to_dict(), "metrics": {"factual": "logit difference answer - wrong at the last position",
                                              "ioi": "logit difference indirect object - subject at the last position",
                                              "safety": "refusal score at the first assistant position"}}

    def _rows(self) -> list[dict[str, Any]]:
        return [{"group": self.groups[i], "counted": bool(self.counted[i]), "span": float(self.span[i]),
                 "metric_clean": float(self.metric_clean[i]), "metric_corrupted": float(self.metric_corrupted[i]),
                 **{name: float(getattr(self, name)[i]) for name in SHARES}} for i in range(len(self.names))]

    def to_dataframe(self) -> Any:
        """One row per pair: name, group, counted, span, the metric's two values and the three shares."""
        import pandas as pd

        return pd.DataFrame([{"pair": name, **row} for name, row in zip(self.names, self._rows())])

    def plot(self, path: str | Path) -> Path:
        """Each counted pair's latents and error shares as dots per group, the medians as bars."""
        medians = self.medians()
        fig, ax = subplots(figsize=(1.5 + 1.8 * len(medians), 3.2))
        for g, group in enumerate(medians):
            for j, name in enumerate(("latents", "error")):
                x = g + (j - 0.5) * 0.4
                rows = [i for i, gr in enumerate(self.groups) if gr == group and bool(self.counted[i])]
                value = medians[group][name]
                ax.bar([x], [value if value is not None else 0.0], width=0.38, color=f"C{j}",
                       label=name if g == 0 else None)
                ax.plot([x] * len(rows), getattr(self, name)[rows].tolist(), "k.", markersize=3)
        ax.set_xticks(range(len(medians)), [f"{g} ({m['n_counted']})" for g, m in medians.items()], fontsize=8)
        ax.axhline(1.0, color="grey", linewidth=0.6, linestyle="--")
        ax.set_ylabel("share of the pair's effect restored")
        ax.set_title(self.site, fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return Path(path)


def pair_set_error_share(model: Any, sae: Any, pairs: Sequence[NamedPair] | None = None, *,
                         config: PairSetConfig | None = None, **overrides: Any) -> PairSetShares:
    """The error share of every pair of `pairs` (the whole named set when None) at `sae`'s site,
    with medians per group over the pairs whose span clears the threshold (module docstring).
    Every prompt is tokenized and checked (equal lengths, single-token answers, a chat template
    for safety pairs) before the first forward pass."""
    config = resolve_config(PairSetConfig, config, overrides)
    pairs = named_pairs(suite=config.suite) if pairs is None else tuple(pairs)
    if not pairs or not all(isinstance(p, NamedPair) for p in pairs):
        raise PatchingError(f"pairs must be a non-empty sequence of NamedPair, got {pairs!r:.80}")
    if config.batch_size is not None and (isinstance(config.batch_size, bool) or config.batch_size < 1):
        raise PatchingError(f"batch_size must be a positive int or None, got {config.batch_size!r}")
    site, _ = resolve_site(model, sae, None, checks=config.checks)
    prepared = [_prepare(model, pair, config.suite or SafetySuite()) for pair in pairs]
    columns: dict[str, list[Tensor]] = {name: [] for name in (*SHARES, "metric_clean", "metric_corrupted")}
    for clean, corrupted, metric in prepared:
        share = error_share(model, {site: sae}, clean, corrupted, metric, batch_size=config.batch_size,
                            memory_mb=config.memory_mb, progress=config.progress, checks=config.checks)
        for name in columns:
            columns[name].append(getattr(share, name).reshape(-1)[0])
    record = provenance(model, saes={site: sae}, prompts={p.name: [p.clean, p.corrupted] for p in pairs},
                        metric={p.name: repr(m) for p, (_, _, m) in zip(pairs, prepared)}, direction="denoise",
                        unit="error_share (named pair set)")
    stacked = {name: torch.stack(values).float() for name, values in columns.items()}
    return PairSetShares(site.hook_name, [p.name for p in pairs], [p.group for p in pairs], **stacked,
                         span_threshold=float(config.span_threshold), provenance=record)


def _prepare(model: Any, pair: NamedPair, suite: SafetySuite) -> tuple[Tensor, Tensor, Any]:
    """(clean tokens, corrupted tokens, metric) of one pair, each prompt a (1, pos) row."""
    if not tl_compat.has_tokenizer(model):
        raise PatchingError("the named pair set is text: the model needs a tokenizer")
    if pair.group == "safety":
        if getattr(tl_compat.tokenizer(model), "chat_template", None) is None:
            raise PatchingError(f"pair {pair.name!r} is read in chat format: the model's tokenizer has no chat template")
        clean, corrupted = tokenize_chat(model, suite, [pair.clean, pair.corrupted])
        metric: Any = RefusalScore.for_model(model)
    else:
        clean, corrupted = tl_compat.to_tokens(model, pair.clean), tl_compat.to_tokens(model, pair.corrupted)
        answer, wrong = (tl_compat.single_token_id(model, text or "") for text in (pair.answer, pair.wrong))
        if answer is None or wrong is None:
            raise PatchingError(f"pair {pair.name!r}: answers {pair.answer!r} and {pair.wrong!r} must each be one "
                                f"token of this model's tokenizer")
        metric = LogitDiff(answer=answer, wrong=wrong)
    if clean.shape != corrupted.shape:
        raise PatchingError(f"pair {pair.name!r}: clean and corrupted prompts tokenize to {clean.shape[1]} and "
                            f"{corrupted.shape[1]} tokens; a pair must have equal lengths")
    return clean, corrupted, metric
