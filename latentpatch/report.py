"""A static HTML report that says what was found: a summary, sections of tables and PNG plots,
and a card for every latent it names. No server, no CDN: the page works offline.

Pages are rendered from the Jinja2 templates in `patching/inspect/templates/` (`patching.inspect.pages`; autoescaped: prompt
and token text is user-supplied and always escaped); `patching.inspect.dashboards` renders its
latent pages from the same cards, so a latent looks the same in the demo report and the dashboards.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


# Cards, cells and the templates live in patching.inspect.pages (the dashboards, in the library, render them too);
# the names the report's callers use are re-exported here.
from patching.inspect.pages import Context, LatentCard, card_from_report, cell, render_template, round_sig  # noqa: F401
from sae.files import atomic_write

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
        # On a few sentences a latent that never fires is not dead, only silent there (a 4608-latent SAE at
        # L0 64 leaves a third silent on the demo's 140 tokens); the registry measures dead latents on 20k tokens.
        tokens = metrics.get("n_tokens")
        words.append(f"{100 * metrics['frac_dead']:.1f}% of latents silent on these {tokens:,} tokens"
                     if isinstance(tokens, int) else f"{100 * metrics['frac_dead']:.1f}% dead")
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
