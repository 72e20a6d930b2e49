"""The app's state and its quick requests: one model, the SAEs fixed at start-up, the held-out texts
the latent cards read, and the latent search.

Requests name an SAE by its index in the start-up list, never by a path: nothing a request carries
reaches the filesystem. Latent cards are rendered from the same Jinja2 macro as the report and the
dashboards (`patching.inspect.pages`), their plot inlined as a data URI, and cached per latent.
"""

from __future__ import annotations

import base64
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from latentpatch.app.checks import AppLimits, latent_index, prompt_tokens
from latentpatch.app.jobs import AppInputError, JobRunner

SEARCH_K = 20
"""Latents listed by a search, strongest first."""
TOKEN_K = 3
"""Latents shown under each token of a searched text."""
MAX_CARDS = 256
"""Rendered cards kept (each carries its plot, ~50 KB): the oldest goes first, so memory stays bounded (R12)."""


class Workbench:
    """Everything the server serves from: built once at start-up, shared by every request."""

    def __init__(self, model: Any, saes: Sequence[Any], names: Sequence[str], *, limits: AppLimits | None = None,
                 card_texts: Sequence[str] | None = None) -> None:
        from patching.splice.collect import resolve_site

        if not saes or len(saes) != len(names):
            raise AppInputError(f"the app needs one or more SAEs, each with a name; got {len(saes)} SAEs, {len(names)} names")
        self.model = model
        self.limits = limits or AppLimits()
        resolved = [resolve_site(model, sae, None) for sae in saes]  # refuses an SAE that does not fit the model
        self.sites = [site for site, _ in resolved]
        self.saes = [sae for _, sae in resolved]
        self.names = list(names)
        self.runner = JobRunner(model)
        self._card_texts = list(card_texts) if card_texts is not None else None
        self._cards: dict[tuple[int, int], str] = {}

    def info(self) -> dict[str, Any]:
        from patching.model import tl_compat

        return {"model": tl_compat.model_name(self.model), "n_layers": tl_compat.n_layers(self.model),
                "saes": [{"index": i, "name": name, "site": site.hook_name, "d_sae": int(sae.d_sae)}
                         for i, (name, site, sae) in enumerate(zip(self.names, self.sites, self.saes))],
                "limits": {"max_prompt_tokens": self.limits.max_prompt_tokens, "max_new_tokens": self.limits.max_new_tokens,
                           "max_coefficient": self.limits.max_coefficient, "max_texts": self.limits.max_texts,
                           "max_k": self.limits.max_k, "max_body_bytes": self.limits.max_body_bytes}}

    def sae(self, index: Any) -> tuple[int, Any]:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.saes):
            raise AppInputError(f"sae: expected an SAE index in 0..{len(self.saes) - 1} ({', '.join(self.names)}), "
                                f"got {index!r}")
        return index, self.saes[index]

    def card_texts(self) -> list[str]:
        """The held-out documents cards read: the real corpus's held-out split, or the default's where
        the real sources cannot be read (as the demo report's cards)."""
        if self._card_texts is None:
            from latentpatch.demo_report import CARD_CHARS
            from training.data.mix import corpus_documents
            from training.data.npm import CorpusUnavailableError

            try:
                documents = corpus_documents("real", "heldout")
            except CorpusUnavailableError:
                documents = corpus_documents("default", "heldout")
            self._card_texts = [text[:CARD_CHARS] for text in documents[: self.limits.card_documents]]
        return self._card_texts

    def search(self, sae_index: Any, text: Any) -> dict[str, Any]:
        """Which latents fire on `text`: ranked by their largest activation on any of its tokens (special
        tokens left out), and the strongest few under each token."""
        from patching.model import tl_compat
        from patching.splice.collect import iter_site_latents

        index, sae = self.sae(sae_index)
        prompt_tokens(self.model, text, "text", self.limits)
        with self.runner.quick():
            (row,) = list(iter_site_latents(self.model, sae, self.sites[index], [text], exclude_special=True))
        z = row.latents.masked_fill(~row.keep[:, None], 0.0)  # (pos, d_sae)
        strings = tl_compat.to_str_tokens(self.model, row.tokens)
        best, where = z.max(dim=0)  # (d_sae,)
        order = torch.argsort(best, descending=True, stable=True)[:SEARCH_K]
        ranked = [{"latent": int(i), "activation": float(best[i]), "position": int(where[i]), "token": strings[int(where[i])]}
                  for i in order.tolist() if best[i] > 0]
        per_token = []
        for p, token in enumerate(strings):
            top = torch.topk(z[p], min(TOKEN_K, z.shape[1]))
            per_token.append({"position": p, "token": token, "counted": bool(row.keep[p]),
                              "latents": [{"latent": int(i), "activation": float(v)}
                                          for v, i in zip(top.values.tolist(), top.indices.tolist()) if v > 0]})
        return {"sae": index, "text": text, "latents": ranked, "tokens": per_token}

    def card(self, sae_index: Any, latent: Any) -> str:
        """The latent's card as HTML (the report's macro): top held-out contexts, histogram and logit
        effect (one plot), promoted and suppressed tokens, auto-label."""
        index, sae = self.sae(sae_index)
        latent = latent_index(latent, int(sae.d_sae))
        key = (index, latent)
        if key not in self._cards:
            texts = self.card_texts()
            with self.runner.quick():
                self._cards[key] = render_card(self.model, sae, latent, texts)
            while len(self._cards) > MAX_CARDS:
                del self._cards[next(iter(self._cards))]
        return self._cards[key]


def render_card(model: Any, sae: Any, latent: int, texts: Sequence[str]) -> str:
    """One latent card, rendered by `macros.html`'s `latent_card` with its plot as a data URI."""
    from patching.inspect.dashboards import plot_activity
    from patching.inspect.latents import inspect_latents
    from patching.inspect.pages import card_from_report, environment

    (report,) = inspect_latents(model, sae, [latent], list(texts), k_contexts=6)
    with tempfile.TemporaryDirectory(prefix="latentpatch-card-") as folder:
        png = plot_activity(report, Path(folder) / "card.png").read_bytes()
    image = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    card = card_from_report(report, image)
    template = environment().from_string('{% import "macros.html" as m %}{{ m.latent_card(card) }}')
    return template.render(card=card)
