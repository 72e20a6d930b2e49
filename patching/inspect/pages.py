"""The pages a person reads about latents: latent cards (top contexts, histogram, logit effect, an
auto-label), cells and tables formatted for people, and the one Jinja2 environment (autoescaped: prompt and
token text is user-supplied and always escaped) over the templates in `templates/` beside this module.
The demo report (`latentpatch.report`), the dashboards and the app render from these, so a latent looks
the same everywhere; every asset is local (the style sheet is inlined, no CDN)."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from markupsafe import Markup, escape

TEMPLATES = Path(__file__).parent / "templates"
"""The templates of the report, the dashboards and the app."""
LATENT_COLUMNS = ("latent", "latents", "top_latents", "latent_ids", "ids")
"""Column and figure names whose integers are latent ids (shown as links to their cards)."""


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
    """Render one of `patching/inspect/templates/` with the shared style sheet inlined (no external asset)."""
    return environment().get_template(name).render(css=Markup((TEMPLATES / "style.css").read_text()), **context)
