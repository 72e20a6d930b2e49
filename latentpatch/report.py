"""A static HTML report that says what was found: a summary, sections of tables and PNG plots,
and a card for every latent it names. No server, no CDN: the page works offline.

Pages are rendered from the Jinja2 templates in `latentpatch/templates/` (autoescaped: prompt
and token text is user-supplied and always escaped); `patching.inspect.dashboards` renders its
latent pages from the same cards, so a latent looks the same in the demo report and the dashboards.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from markupsafe import Markup, escape

from sae.files import atomic_write

TEMPLATES = Path(__file__).parent / "templates"
LATENT_COLUMNS = ("latent", "latents", "top_latents", "latent_ids", "ids")
"""Column and figure names whose integers are latent ids (shown as links to their cards)."""


@dataclass
class Section:
    """One part of the report."""

    title: str
    """Heading (backticks mark `code`)."""
    text: str = ""
    """A paragraph of explanation (plain text; backticks mark `code`)."""
    figures: dict[str, Any] = field(default_factory=dict)
    """Numbers shown as a two-column table."""
    images: list[str] = field(default_factory=list)
    """PNG file names relative to the report folder."""
    table: list[dict[str, Any]] = field(default_factory=list)
    """Rows of a wider table (e.g. top latents); columns from the rows' keys, first seen first."""
    notes: list[str] = field(default_factory=list)
    """Findings shown as a bulleted list, one sentence each (after the text)."""


@dataclass(frozen=True)
class Context:
    """One activating context, split around its activating token."""

    activation: float
    before: str
    token: str
    after: str


@dataclass
class LatentCard:
    """What a person needs to see about one latent (Bricken et al. 2023's feature pages, Neuronpedia's cards)."""

    latent: int
    site: str
    label: str
    """A short auto-label from its top tokens (`auto_label`)."""
    n_active: int
    n_tokens: int
    contexts: list[Context]
    promoted: list[tuple[str, float]]
    """Tokens its decoder direction promotes through the unembedding, with the logit effect; empty off the residual stream."""
    suppressed: list[tuple[str, float]]
    image: str | None = None
    """PNG (logit effect and histogram) relative to the page."""

    @property
    def frequency(self) -> float:
        return self.n_active / max(self.n_tokens, 1)


def auto_label(contexts: Sequence[Context], promoted: Sequence[tuple[str, float]], k: int = 3) -> str:
    """A label from the tokens it fires on most (the highlighted tokens of its top contexts) and the
    tokens it promotes most: a cheap stand-in for an explanation, read as a hint, not a claim."""
    fired = [token for token, _ in Counter(c.token for c in contexts).most_common(k)]
    parts = []
    if fired:
        parts.append("fires on " + ", ".join(repr(t) for t in fired))
    if promoted:
        parts.append("promotes " + ", ".join(repr(t) for t, _ in promoted[:k]))
    return "; ".join(parts) or "never active on the held-out text"


def card_from_report(report: Any, image: str | None = None) -> LatentCard:
    """A card from a `patching.inspect.latents.LatentReport` (its contexts carry «marked» tokens)."""
    from patching.inspect.latents import MARK_CLOSE, MARK_OPEN

    contexts = []
    for c in report.contexts:
        before, _, rest = c.text.partition(MARK_OPEN)
        token, _, after = rest.partition(MARK_CLOSE)
        contexts.append(Context(c.activation, before, token, after))
    promoted = [(e.token, e.logit) for e in report.top_tokens or []]
    suppressed = [(e.token, e.logit) for e in report.bottom_tokens or []]
    return LatentCard(report.latent, report.site.hook_name, auto_label(contexts, promoted), report.n_active,
                      report.n_tokens, contexts, promoted, suppressed, image)


def round_sig(value: Any, digits: int = 3) -> str:
    """A number for people: 3 significant figures, no exponent for everyday magnitudes, thousands separated."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 1e6:
        text = f"{value:,.{max(digits - 1 - math.floor(math.log10(abs(value))), 0) if value else 0}f}"
        return text
    return f"{value:.{digits - 1}e}"


def cell(value: Any) -> str:
    """Any value as short text for a table cell: never JSON; dicts as `key value` pairs, lists joined."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return round_sig(value)
    if isinstance(value, Mapping):
        return "; ".join(f"{heading(k)} {cell(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        shown = ", ".join(cell(v) for v in value[:12])
        return shown + (f" (+{len(value) - 12} more)" if len(value) > 12 else "")
    return str(value)


def heading(name: Any) -> str:
    return str(name).replace("_", " ")


def prose(text: str) -> Markup:
    """Escaped text with `backticks` shown as code (the sections' texts are written in that light markdown)."""
    escaped = str(escape(text))
    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped))


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


@cache
def environment() -> Any:
    """The one Jinja2 environment (autoescaped whatever the file name) for the report, dashboards and app."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(cell=cell, round_sig=round_sig, heading=heading, prose=prose, columns=_columns, token=repr, zip=zip)
    env.tests.update(latent_column=lambda name: str(name) in LATENT_COLUMNS,
                     latent_id=lambda v: isinstance(v, int) and not isinstance(v, bool),
                     latent_list=lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in v))
    return env


def render_template(name: str, **context: Any) -> str:
    """Render one of `latentpatch/templates/` with the shared style sheet inlined (no external asset)."""
    return environment().get_template(name).render(css=Markup((TEMPLATES / "style.css").read_text()), **context)


def render(sections: list[Section], title: str, *, summary: Sequence[str] = (), cards: Sequence[LatentCard] = (),
           provenance: Mapping[str, Any] | None = None) -> str:
    """The report page: summary sentences, sections, latent cards (linked from every latent id), provenance."""
    return render_template("report.html", title=title, summary=list(summary), sections=sections,
                           cards={card.latent: card for card in cards}, provenance=dict(provenance or {}))


def write_report(folder: Path, sections: list[Section], title: str, results: dict[str, Any], *,
                 summary: Sequence[str] = (), cards: Sequence[LatentCard] = (),
                 provenance: Mapping[str, Any] | None = None) -> Path:
    """index.html and results.json in `folder` (atomic writes); returns the HTML path.
    Every image a section or card names must already be in `folder` (checked before writing)."""
    folder.mkdir(parents=True, exist_ok=True)
    named = [name for s in sections for name in s.images] + [card.image for card in cards if card.image]
    missing = [name for name in named if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"report images missing from {folder}: {missing}")
    atomic_write(folder / "results.json", json.dumps(results, indent=1, default=str).encode())
    page = render(sections, title, summary=summary, cards=cards, provenance=provenance)
    atomic_write(folder / "index.html", page.encode())
    return folder / "index.html"


QUALITY = (("explained_variance", 0.8, 0.6, "explained variance"), ("ce_loss_score", 0.9, 0.7, "CE loss recovered"),
           ("kl_div_score", 0.9, 0.7, "KL score"))
"""(figure, good from, fair from, name): rough bars from SAEBench's core results on small models
(Karvonen et al. 2025), where good residual SAEs recover over 90% of the CE loss."""


def quality_sentence(metrics: Mapping[str, Any]) -> str:
    """The SAE's core figures in one sentence, each with a word on whether it is good."""
    words = []
    for key, good, fair, name in QUALITY:
        value = metrics.get(key)
        if isinstance(value, (int, float)):
            verdict = "good" if value >= good else "fair" if value >= fair else "poor"
            words.append(f"{name} {value:.2f} ({verdict})")
    if isinstance(metrics.get("l0"), (int, float)):
        words.append(f"L0 {metrics['l0']:.0f} latents per token")
    if isinstance(metrics.get("frac_dead"), (int, float)):
        words.append(f"{100 * metrics['frac_dead']:.1f}% dead")
    return "Spliced into the model on held-out sentences: " + ", ".join(words) + "." if words else ""


def demo_summary(results: Mapping[str, Any]) -> list[str]:
    """Key findings of a demo run as sentences, every number read from `results` (what `run_demo` returns)."""
    sentences = [s for s in (quality_sentence(results.get("splice_metrics", {})),) if s]
    sweep = results.get("sweep", {})
    top = [row for row in sweep.get("top", []) if row.get("kind") == "latent"]
    if sweep.get("by_position"):
        where = max(sweep["by_position"], key=lambda row: abs(row["effect"]))
        sentences.append(f"The {sweep.get('contrast', 'clean vs corrupted')} effect sits at position {where['position']} "
                         f"(token {where['token']!r}), where the sweep's latent effects sum to {where['effect']:.2f}.")
    if top:
        best = top[0]
        sentences.append(f"Latent {best['latent']} alone restores {100 * best['effect']:.0f}% of the logit difference "
                         f"(at {best['token']!r}).")
    if "joint_top10" in sweep:
        sentences.append(f"The sweep's top 10 latents patched jointly restore {100 * sweep['joint_top10']:.0f}%; "
                         f"the SAE's error node alone restores {100 * sweep['error_node']:.0f}%.")
    check = results.get("attribution", {})
    if "spearman" in check:
        sentences.append(f"Attribution patching ranks units like exact patching: Spearman {check['spearman']:.2f}, "
                         f"recall@{check['k']} {check['recall_at_k']:.2f} on {check['n_checked']} units checked.")
    if check.get("errors_in_top10"):
        sentences.append(f"{check['errors_in_top10']} of AtP's 10 largest units are SAE error nodes: part of the effect "
                         "runs through what the SAE does not reconstruct.")
    if "seconds" in results:
        sentences.append(f"The whole run took {results['seconds'] / 60:.1f} min.")
    return sentences
