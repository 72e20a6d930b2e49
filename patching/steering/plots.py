"""The Top-1 versus Top-K comparison drawn: target effect and KL cost against K, one line per method
and coefficient."""

from __future__ import annotations

from pathlib import Path
from typing import Any

def plot_comparison(table: Any, path: Path, *, title: str = "") -> Path:
    """Effect against cost, one curve per K (points ordered by coefficient), one column per method:
    top row KL on neutral text, bottom row perplexity of steered continuations."""
    from matplotlib.ticker import NullFormatter

    from patching.figures import subplots

    methods = [m for m in table["method"].unique() if m != "none"]
    base = table[table["method"] == "none"]
    fig, axes = subplots(2, max(len(methods), 1), figsize=(5.5 * max(len(methods), 1), 8), squeeze=False)
    for j, method in enumerate(methods):
        part = table[table["method"] == method]
        for row, cost in enumerate(("kl_neutral", "gen_perplexity")):
            ax = axes[row, j]
            for k in sorted(part["k"].unique()):
                curve = part[part["k"] == k].sort_values("coefficient")
                ax.plot(curve[cost], curve["target_effect"], marker="o", label=f"K={k}")
            ax.scatter(base[cost], base["target_effect"], marker="*", s=120, color="black", label="unsteered", zorder=3)
            ax.set_xlabel("KL(unsteered || steered) on neutral text [nats]" if row == 0
                          else "perplexity of steered continuations (unsteered model)")
            ax.set_ylabel("target effect (Δ score)")
            # KL starts at exactly 0 (the unsteered point); perplexity spans orders of magnitude.
            if row == 0:
                ax.set_xscale("symlog", linthresh=1e-3)
            else:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{title} — {method}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
