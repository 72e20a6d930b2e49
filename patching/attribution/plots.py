"""PNG plots of restoration curves: the fraction of a behaviour restored against the units patched."""

from __future__ import annotations

from pathlib import Path

import torch

from patching.figures import subplots
from sae.metrics import median


def plot_restoration(latents, raw, path: Path, *, title: str) -> Path:
    """Fraction of the behaviour restored against the percent of units patched: SAE latents
    against raw units, one thin line per pair and the median in bold."""
    return plot_restoration_curves({"SAE latents": latents, "raw dimensions": raw}, path, title=title,
                                   ylabel="fraction of refusal score restored")


COLORS = ("tab:red", "tab:gray", "tab:blue", "tab:green", "tab:purple")


def plot_restoration_curves(curves, path: Path, *, title: str, ylabel: str, x: str = "percent") -> Path:
    """Restoration curves (`{label: RestorationCurve}`) against the units patched, as a percent
    of the active units (`x="percent"`) or as a count (`x="count"`); one thin line per pair, the
    median in bold, dotted lines at 50% and 90%."""
    fig, ax = subplots(figsize=(7, 4.5))
    for (label, curve), color in zip(curves.items(), COLORS * len(curves)):
        if x == "percent":
            xs_rows = [[100.0 * n / active for n in curve.counts] for active in curve.n_active]
        else:
            xs_rows = [list(curve.counts) for _ in curve.n_active]
        for xs, row in zip(xs_rows, curve.fraction.tolist()):
            ax.plot(xs, row, color=color, alpha=0.25, linewidth=0.8)
        median_x = median(torch.tensor(xs_rows), 0).tolist()
        ax.plot(median_x, curve.median(), color=color, linewidth=2.2, marker="o", label=f"{label} (median)")
    ax.axhline(0.9, color="black", linestyle=":", linewidth=0.8)
    ax.axhline(0.5, color="black", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("units patched (% of active latents / of dimensions x positions)" if x == "percent"
                  else "(position, unit) elements patched jointly")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
