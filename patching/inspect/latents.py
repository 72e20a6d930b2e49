"""Inspecting a latent: what it writes (logit effect) and what makes it fire (contexts, histogram).

For latent `i` of an SAE at a residual-width site:
- logit effect: `W_dec[i]` through the final norm's weight and the unembedding, the direct path
  to the logits (the "logit lens" view of a decoder direction, Bricken et al. 2023, "Towards
  Monosemanticity", section "Feature interpretability");
- top-activating contexts over a corpus, the activating token marked «like this»;
- the histogram of its non-zero activations and how often it fires.

Any latent of any SAE (ours or SAELens's); the corpus is a list of texts or a batch of token ids.
`iter_site_latents` is the harvesting loop the steering module reuses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from patching.configs import resolve_config
from patching.errors import PatchingError
from patching.model import tl_compat
from patching.model.sites import Site
from patching.model.checks import check_latent_indices
from patching.splice.collect import Corpus, iter_site_latents, resolve_site
from patching.splice.splicer import SpliceChecks
from sae.deprecation import positional_config, renamed_fields, renamed_keywords
from sae.protocol import SAELike

MARK_OPEN, MARK_CLOSE = "«", "»"


class TokenEffect(NamedTuple):
    """One token's direct logit effect."""

    token: str
    """The token as text."""
    token_id: int
    """Its id."""
    logit: float
    """Logit added per unit of the latent's activation (through the final norm's weight)."""


class ActivatingContext(NamedTuple):
    """A corpus position where the latent fires strongly."""

    activation: float
    """The latent's activation there."""
    row: int
    """Corpus row."""
    position: int
    """Token position in the row."""
    token: str
    """The activating token."""
    text: str
    """Surrounding text with the activating token marked «like this»."""


@renamed_fields(batch_rows="batch_size")  # the old name works for one release, with a DeprecationWarning
@dataclass(frozen=True)
class InspectConfig:
    """How much `inspect_latents` reports."""

    k_tokens: int = 10
    """Tokens listed with the largest (and the most negative) logit effect."""
    k_contexts: int = 8
    """Top-activating contexts listed."""
    context_before: int = 12
    """Tokens of context shown before the activating token."""
    context_after: int = 4
    """Tokens of context shown after it."""
    bins: int = 30
    """Histogram bins over the non-zero activations."""
    batch_size: int = 8
    """Corpus rows per forward pass."""
    exclude_special: bool = True
    """Leave special tokens (BOS, EOS, padding) out: BOS's residual is an outlier in most models."""

    def __post_init__(self) -> None:
        for name in ("k_tokens", "k_contexts", "bins", "batch_size"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("context_before", "context_after"):
            _check_int(name, getattr(self, name), minimum=0)


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PatchingError(f"InspectConfig.{name} must be an int >= {minimum}, got {value!r}")


@dataclass
class LatentReport:
    """Everything `inspect_latents` found about one latent."""

    latent: int
    """Latent index."""
    site: Site
    """The SAE's site."""
    top_tokens: list[TokenEffect] | None
    """Largest direct logit effects; None when the site is not residual-width (no unembedding path)."""
    bottom_tokens: list[TokenEffect] | None
    """Most negative direct logit effects."""
    contexts: list[ActivatingContext]
    """Top-activating contexts, strongest first."""
    counts: Tensor
    """Histogram counts of the non-zero activations, `(bins,)`."""
    edges: Tensor
    """Histogram bin edges, `(bins + 1,)`."""
    n_tokens: int
    """Corpus positions counted."""
    n_active: int
    """Positions where the latent is non-zero."""

    @property
    def frequency(self) -> float:
        return self.n_active / max(self.n_tokens, 1)

    def to_text(self) -> str:
        lines = [f"latent {self.latent} at {self.site.hook_name}: fires on {self.n_active}/{self.n_tokens} tokens "
                 f"({100 * self.frequency:.2f}%)"]
        for title, effects in (("top logit effect", self.top_tokens), ("bottom logit effect", self.bottom_tokens)):
            if effects is not None:
                lines.append(f"  {title}: " + ", ".join(f"{e.token!r} {e.logit:+.3f}" for e in effects))
        lines.append("  top-activating contexts:")
        lines += [f"    {c.activation:8.3f}  {c.text!r}" for c in self.contexts] or ["    (never active in the corpus)"]
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """PNG: logit-effect bars, activation histogram and the top contexts."""
        return _plot_report(self, Path(path))


def logit_effect(model: Any, sae: SAELike, latent: int, k: int = 10) -> tuple[list[TokenEffect], list[TokenEffect]] | None:
    """The `k` tokens with the largest and the most negative direct logit effect of `W_dec[latent]`,
    or None when the SAE's width is not the model's residual width."""
    if sae.d_in != tl_compat.d_model(model):
        return None
    return direction_effect(model, sae.W_dec[latent], k)


def direction_effect(model: Any, direction: Tensor, k: int = 10) -> tuple[list[TokenEffect], list[TokenEffect]]:
    """The `k` tokens with the largest and the most negative direct logit effect of a
    residual-stream direction `(d_model,)` (a decoder row, a neuron's output weights)."""
    with torch.inference_mode():
        logits = tl_compat.direction_logits(model, direction.detach().float()).float().cpu()
    k = min(k, logits.shape[0])
    effects = []
    for values, ids in (torch.topk(logits, k), torch.topk(-logits, k)):
        strings = tl_compat.to_str_tokens(model, ids)
        effects.append([TokenEffect(s, int(i), float(logits[i])) for s, i in zip(strings, ids)])
    return effects[0], effects[1]


@renamed_keywords(batch_rows="batch_size")
@positional_config
def inspect_latents(model: Any, sae: Any, latents: Sequence[int], corpus: Corpus, *, config: InspectConfig | None = None,
                    site: Site | None = None, checks: SpliceChecks | None = None, **overrides: Any) -> list[LatentReport]:
    """Reports for several latents from one pass over the corpus (validated before any forward).

    `config` (an `InspectConfig`) with `overrides` replacing single fields (`k_contexts=4`)."""
    config = resolve_config(InspectConfig, config, overrides)
    site, sae = resolve_site(model, sae, site, checks=checks)
    latents = check_latent_indices(latents, sae.d_sae)
    rows: list[Tensor] = []
    active: list[list[Tensor]] = [[] for _ in latents]
    candidates: list[list[tuple[float, int, int]]] = [[] for _ in latents]
    n_tokens = 0
    for item in iter_site_latents(model, sae, site, corpus, latents=latents, batch_rows=config.batch_size,
                                  exclude_special=config.exclude_special):
        rows.append(item.tokens)
        n_tokens += int(item.keep.sum())
        values = item.latents.masked_fill(~item.keep[:, None], 0.0)  # (pos, n)
        for j in range(len(latents)):
            column = values[:, j]
            active[j].append(column[column > 0])
            top = torch.topk(column, min(config.k_contexts, len(column)))
            candidates[j] += [(float(v), item.row, int(p)) for v, p in zip(top.values, top.indices) if v > 0]
    reports = []
    for j, latent in enumerate(latents):
        values = torch.cat(active[j]) if active[j] else torch.zeros(0)
        counts, edges = histogram(values, config.bins)
        best = sorted(candidates[j], key=lambda c: -c[0])[: config.k_contexts]
        contexts = [activating_context(model, rows[r], p, a, r, config) for a, r, p in best]
        effect = logit_effect(model, sae, latent, config.k_tokens)
        reports.append(LatentReport(latent, site, effect[0] if effect else None, effect[1] if effect else None,
                                    contexts, counts, edges, n_tokens, int(values.numel())))
    return reports


@renamed_keywords(batch_rows="batch_size")
@positional_config
def inspect_latent(model: Any, sae: Any, latent: int, corpus: Corpus, *, config: InspectConfig | None = None,
                   site: Site | None = None, checks: SpliceChecks | None = None, **overrides: Any) -> LatentReport:
    """`inspect_latents` for one latent."""
    return inspect_latents(model, sae, [latent], corpus, config=config, site=site, checks=checks, **overrides)[0]


def histogram(values: Tensor, bins: int) -> tuple[Tensor, Tensor]:
    if values.numel() == 0:
        return torch.zeros(bins), torch.linspace(0.0, 1.0, bins + 1)
    lo, hi = min(float(values.min()), 0.0), float(values.max())
    counts, edges = torch.histogram(values, bins=bins, range=(lo, hi if hi > lo else lo + 1.0))
    return counts, edges


def activating_context(model: Any, tokens: Tensor, position: int, activation: float, row: int, config: InspectConfig) -> ActivatingContext:
    start, stop = max(position - config.context_before, 0), min(position + 1 + config.context_after, len(tokens))
    before = tl_compat.to_string(model, tokens[start:position]) if position > start else ""
    token = tl_compat.to_string(model, tokens[position:position + 1])
    after = tl_compat.to_string(model, tokens[position + 1:stop]) if stop > position + 1 else ""
    if not tl_compat.has_tokenizer(model):  # token ids as text: keep them apart
        before, after = (before + " " if before else ""), (" " + after if after else "")
    text = f"{before}{MARK_OPEN}{token}{MARK_CLOSE}{after}"
    return ActivatingContext(activation, row, position, token, text)


def _plot_report(report: LatentReport, path: Path) -> Path:
    from patching.figures import figure

    fig = figure(figsize=(11, 4.5 + 0.16 * max(len(report.contexts), 1)))
    grid = fig.add_gridspec(2, 2, height_ratios=(3.0, 0.4 + 0.16 * max(len(report.contexts), 1)))
    bars, hist, text = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    draw_logit_effect(bars, report.top_tokens, report.bottom_tokens)
    draw_histogram(hist, report.counts, report.edges, report.n_active, report.n_tokens, label="activation (non-zero only)")
    text.axis("off")
    shown = [f"{c.activation:7.2f}  {_safe(repr(c.text))[:140]}" for c in report.contexts] or ["(never active)"]
    text.text(0.0, 1.0, "top-activating contexts\n" + "\n".join(shown), va="top", ha="left", family="monospace", fontsize=7)
    fig.suptitle(f"latent {report.latent} at {report.site.hook_name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def draw_logit_effect(ax: Any, top: list[TokenEffect] | None, bottom: list[TokenEffect] | None) -> None:
    """Horizontal bars of the top and bottom direct logit effects on a matplotlib axis."""
    if top is not None and bottom is not None:
        effects = top[::-1] + bottom[::-1]
        ax.barh(range(len(effects)), [e.logit for e in effects],
                color=["tab:blue" if e.logit >= 0 else "tab:red" for e in effects])
        ax.set_yticks(range(len(effects)), [_safe(repr(e.token)) for e in effects], fontsize=7)
        ax.set_xlabel("direct logit effect per unit activation")
    else:
        ax.text(0.5, 0.5, "site is not residual-width:\nno direct path to the logits", ha="center", va="center")
    ax.set_title("logit effect (top and bottom tokens)", fontsize=9)


def draw_histogram(ax: Any, counts: Tensor, edges: Tensor, n_active: int, n_tokens: int, *, label: str) -> None:
    """Activation histogram on a matplotlib axis, titled with the firing density."""
    widths = (edges[1:] - edges[:-1]).numpy()
    ax.bar(edges[:-1].numpy(), counts.numpy(), width=widths, align="edge", color="tab:green")
    ax.set_xlabel(label)
    ax.set_ylabel("tokens")
    ax.set_title(f"fires on {n_active}/{n_tokens} tokens ({100 * n_active / max(n_tokens, 1):.2f}%)", fontsize=9)


def _safe(text: str) -> str:
    """Matplotlib reads `$...$` as mathtext; tokens may hold dollars."""
    return text.replace("$", r"\$")
