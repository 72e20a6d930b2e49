"""The demo report's findings and latent cards: the numbers `latentpatch.report.demo_summary`
turns into sentences (where the sweep's effect sits, the top 10 latents jointly, the error node)
and a card for every latent the report names, drawn from held-out real text."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from latentpatch.report import LatentCard, card_from_report

log = logging.getLogger(__name__)

CARD_DOCUMENTS = 48
"""Held-out documents the cards' contexts and histograms come from (the first of the fixed order)."""
CARD_CHARS = 1200
"""Each document's first characters (long documents would dominate the pass)."""
MAX_CARDS = 40


def by_position(sweep: Any) -> list[dict[str, Any]]:
    """The sweep's latent effects summed per position: where in the prompt the effect sits."""
    sums: dict[int, dict[str, Any]] = {}
    for entry in sweep.top(len(sweep.units)):
        if entry.kind == "latent" and entry.position is not None:
            row = sums.setdefault(entry.position, {"position": entry.position, "token": entry.token, "effect": 0.0})
            row["effect"] += entry.effect
    return [dict(row, effect=round(row["effect"], 4)) for _, row in sorted(sums.items())]


def joint_and_error(model: Any, sae: Any, sweep: Any, clean: str, corrupted: str, metric: Any) -> dict[str, float]:
    """Exact effects of the sweep's top 10 single latents patched jointly, and of the SAE's error
    node at every position alone (Marks et al. 2024, "Sparse Feature Circuits", treat the error as one more node)."""
    from patching import Site, patch_latents
    from patching.attribution.restoration import joint_latent_unit
    from patching.sweep.units import PatchUnit, UnitPart

    site = Site.from_hook_name(sae.cfg.hook_name)
    order = sweep.mean_effect.abs().argsort(descending=True).tolist()
    singles = [sweep.units[j] for j in order if _single_latent(sweep.units[j])][:10]
    units = [joint_latent_unit(singles, site), PatchUnit((UnitPart(site, "error", None),))]
    exact = patch_latents(model, sae, clean, corrupted, metric, units=units, progress=False)
    return {"joint_top10": round(exact.mean_effect[0].item(), 4), "error_node": round(exact.mean_effect[1].item(), 4)}


def _single_latent(unit: Any) -> bool:
    return unit.kind == "latent" and unit.latent is not None and unit.position is not None


def mentioned_latents(results: dict[str, Any]) -> list[int]:
    """Every latent the report names, in order of first mention (the sweep's top, then steering's sets)."""
    found = [row["latent"] for row in results.get("sweep", {}).get("top", []) if row.get("latent") is not None]
    for row in results.get("steering", []):
        found += [int(x) for x in str(row.get("latents", "")).split()]
    return list(dict.fromkeys(found))[:MAX_CARDS]


def latent_cards(model: Any, sae: Any, latents: list[int], out: Path) -> list[LatentCard]:
    """One card per latent from one pass over held-out real text (the default corpus's held-out
    split where the real sources cannot be read), its plot written into `out`."""
    from patching.inspect.dashboards import plot_activity
    from patching.inspect.latents import inspect_latents
    from training.data.mix import corpus_documents
    from training.data.npm import CorpusUnavailableError

    if not latents:
        return []
    try:
        documents = corpus_documents("real", "heldout")
    except CorpusUnavailableError:
        documents = corpus_documents("default", "heldout")
    texts = [text[:CARD_CHARS] for text in documents[:CARD_DOCUMENTS]]
    reports = inspect_latents(model, sae, latents, texts, k_contexts=6)
    return [card_from_report(report, plot_activity(report, out / f"latent-{report.latent}.png").name) for report in reports]


def plot_training(history: list[dict[str, Any]], path: Path) -> None:
    from patching.figures import subplots

    fig, axes = subplots(1, 3, figsize=(11, 3))
    steps = [record["step"] for record in history]
    for ax, key, name in zip(axes, ("mse", "explained_variance", "l0"), ("MSE (normalised)", "explained variance", "L0")):
        ax.plot(steps, [record[key] for record in history], marker=".")
        ax.set_xlabel("step")
        ax.set_title(name)
    fig.suptitle("Training demonstration on real text (live metrics as logged)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
