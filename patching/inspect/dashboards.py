"""Static HTML dashboards for SAE latents, MLP neurons and residual directions (no server needed).

One page per unit: top-activating contexts with the activating token highlighted, the
activation histogram and firing density, the direct logit effect (top promoted and suppressed
tokens), the token-concentration score and, for neurons and directions, the latent
decomposition: the latents that drive each top context, each latent's share of the unit's
variance and the top contexts grouped by dominant latent. Plots are PNG files beside the pages;
`index.html` lists every unit. Pages are built from `LatentReport` (`patching.inspect.latents`)
and `UnitReport` (`patching.inspect.neuron_cards`) values, written atomically.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from patching.inspect.latents import MARK_CLOSE, MARK_OPEN, LatentReport, TokenEffect, draw_histogram, draw_logit_effect
from patching.inspect.neuron_cards import UnitReport
from patching.inspect.neurons import Neuron, token_concentration
from sae.files import atomic_write

Report = LatentReport | UnitReport


def slug(report: Report) -> str:
    """File-name stem of a report's page: `latent-12`, `L12N40`, `dir-name-blocks.6.hook_resid_pre`."""
    label = f"latent-{report.latent}" if isinstance(report, LatentReport) else report.label
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


def write_dashboards(folder: str | Path, reports: Sequence[Report], *, title: str = "latentpatch dashboards",
                     provenance: Mapping[str, object] | None = None) -> Path:
    """Write one page (and its PNGs) per report and `index.html`; return the index's path.

    `provenance` (model, SAE hash, corpus, library version, ...) is listed on the index page."""
    from patching.inspect.pages import auto_label, card_from_report, render_template

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for report in reports:
        page = write_page(folder, report)
        kind = "latent" if isinstance(report, LatentReport) else "neuron" if isinstance(report.unit, Neuron) else "direction"
        label = card_from_report(report).label if isinstance(report, LatentReport) else auto_label([], [])
        rows.append({"page": page.name, "title": _title(report), "kind": kind, "label": label,
                     "density": f"{100 * report.frequency:.2f}%", "score": _num(_token_score(report)),
                     "token": report.contexts[0].token if report.contexts else ""})
    index = folder / "index.html"
    atomic_write(index, render_template("dashboard_index.html", title=title, rows=rows,
                                        provenance=dict(provenance or {})).encode())
    return index


def write_page(folder: Path, report: Report) -> Path:
    """One unit's page and its PNG plots in `folder`: a latent's page is its card (the demo report's
    template); a neuron's or direction's adds the latent decomposition."""
    from patching.inspect.pages import card_from_report, render_template

    stem = slug(report)
    images = [plot_activity(report, folder / f"{stem}_activity.png")]
    if isinstance(report, LatentReport):
        page = folder / f"{stem}.html"
        atomic_write(page, render_template("dashboard_page.html", title=_title(report), score=_num(_token_score(report)),
                                           card=card_from_report(report, images[0].name)).encode())
        return page
    decomposition = None
    if isinstance(report, UnitReport):
        images.append(_plot_decomposition(report, folder / f"{stem}_decomposition.png"))
        decomposition = _decomposition(report, images[1].name)
    effects = (None if report.top_tokens is None or report.bottom_tokens is None else
               [(_effect(a), _effect(b)) for a, b in zip(report.top_tokens, report.bottom_tokens)])
    page = folder / f"{stem}.html"
    atomic_write(page, render_template(
        "unit_page.html", title=_title(report), n_active=report.n_active, n_tokens=report.n_tokens,
        density=f"{100 * report.frequency:.2f}%", score=_num(_token_score(report)), activity_image=images[0].name,
        effects=effects, contexts=_contexts(report), has_terms=isinstance(report, UnitReport) and bool(report.terms),
        decomposition=decomposition).encode())
    return page


def _title(report: Report) -> str:
    if isinstance(report, LatentReport):
        return f"latent {report.latent} at {report.site.hook_name}"
    return f"{report.label} (SAE at {report.sae_site.hook_name})"


def _token_score(report: Report) -> float | None:
    if isinstance(report, UnitReport):
        return report.token_score
    return token_concentration([c.token for c in report.contexts if c.activation > 0])


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def split_context(text: str) -> dict[str, str]:
    """A context's text around its «activating token», for the templates to escape and mark."""
    before, _, rest = text.partition(MARK_OPEN)
    token, _, after = rest.partition(MARK_CLOSE)
    return {"before": before, "token": token, "after": after}


def highlight(text: str) -> str:
    """A context's text, escaped, with the «activating token» in a <mark>."""
    parts = split_context(text)
    return f"{html.escape(parts['before'])}<mark>{html.escape(parts['token'])}</mark>{html.escape(parts['after'])}"


def _effect(effect: TokenEffect) -> dict[str, str]:
    return {"token": repr(effect.token), "logit": f"{effect.logit:+.3f}"}


def _contexts(report: Report) -> list[dict[str, object]]:
    """The top contexts as the page's rows; a neuron's or direction's carry its decomposition terms."""
    terms = report.terms if isinstance(report, UnitReport) else []
    rows: list[dict[str, object]] = []
    for i, context in enumerate(report.contexts):
        term = None
        if i < len(terms):
            t = terms[i]
            term = {"total": f"{t.total:+.3f}", "error": f"{t.error:+.3f}",
                    "latents": ", ".join(f"#{latent} {value:+.2f}" for latent, value in t.latents)}
        rows.append({"activation": f"{context.activation:.3f}", "term": term, **split_context(context.text)})
    return rows


def _decomposition(report: UnitReport, image: str) -> dict[str, object]:
    """The decomposition sections' data: variance shares and the top contexts grouped by dominant latent."""
    variance = [(f"#{latent}", f"{share:.3f}") for latent, share in report.variance]
    variance += [(name, f"{share:.3f}") for name, share in report.variance_terms.items()]
    groups = [{"latent": latent, "size": len(members),
               "shown": [split_context(report.contexts[i].text) for i in members if i < len(report.contexts)]}
              for latent, members in report.groups]
    return {"site": report.sae_site.hook_name, "image": image, "variance": variance, "n_terms": len(report.terms),
            "cluster_score": _num(report.cluster_score), "groups": groups}


def plot_activity(report: Report, path: Path) -> Path:
    """PNG: the direct logit effect and the activation histogram (the demo report's latent cards use it too).

    Tokens in scripts the plot font lacks (CJK in real text) are drawn as boxes without a warning per
    glyph; the page's tables beside the plot show them in the browser's fonts."""
    import warnings

    from patching.figures import subplots

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font", category=UserWarning)
        fig, (bars, hist) = subplots(1, 2, figsize=(11, 4))
        draw_logit_effect(bars, report.top_tokens, report.bottom_tokens)
        label = "activation (non-zero only)" if isinstance(report, LatentReport) else "activation"
        draw_histogram(hist, report.counts, report.edges, report.n_active, report.n_tokens, label=label)
        fig.suptitle(_title(report), fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    return path


def _plot_decomposition(report: UnitReport, path: Path) -> Path:
    from patching.figures import subplots

    fig, (shares, groups) = subplots(1, 2, figsize=(11, 3.8))
    names = [f"#{latent}" for latent, _ in report.variance] + list(report.variance_terms)
    values = [share for _, share in report.variance] + list(report.variance_terms.values())
    shares.barh(range(len(values)), values, color=["tab:purple"] * len(report.variance) + ["tab:gray"] * len(report.variance_terms))
    shares.set_yticks(range(len(values)), names, fontsize=7)
    shares.invert_yaxis()
    shares.set_xlabel("share of the pre-activation's variance")
    shares.set_title("latents by Cov(term, pre) / Var(pre)", fontsize=9)
    sizes = [len(members) for _, members in report.groups][:15]
    groups.bar(range(len(sizes)), sizes, color="tab:orange")
    groups.set_xticks(range(len(sizes)), [f"#{latent}" for latent, _ in report.groups][:15], rotation=60, fontsize=7)
    groups.set_ylabel("top contexts")
    groups.set_title(f"top {len(report.terms)} contexts by dominant latent", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
