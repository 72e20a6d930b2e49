"""What `find_safety_latents` measured, its plot, and one paragraph computed from the numbers."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save as save_safetensors_bytes

from patching.figures import subplots
from patching.safety.curves import UnitCurve
from patching.safety.direction import DirectionReport
from patching.saved import FORMAT_VERSION, RESULT_FILE, TENSORS_FILE, SavedResult, class_name, encode
from sae.deprecation import warn_deprecated
from sae.files import atomic_folder

REPORT_FILES = ("report.json", "prompts.json", "curves.png", RESULT_FILE, TENSORS_FILE)
REFUSAL_METRIC = "logsumexp refusal-start − compliance-start logits at the first assistant position"

CLAIM = "about 5% of safety neurons restore about 90% of safety performance (Chen et al. 2024)"


@dataclass
class SafetyReport(SavedResult):
    """Refusal rates, unit curves, the refusal direction and dynamic patching on one suite."""

    sites: list[str]
    """Hook names of the SAEs."""
    config: Any
    """The `SafetyConfig` used."""
    suite: Any
    """The `SafetySuite` used."""
    model_name: str
    """The model's name."""
    refusal_rates: dict[str, float] = field(default_factory=dict)
    """Greedy refusal rate on harmful, harmless, jailbreak and control prompts."""
    spans: list[float] = field(default_factory=list)
    """Per suite pair: refusal score(harmful) − refusal score(harmless)."""
    pairs_used: list[int] = field(default_factory=list)
    """Suite indices of the pairs whose span cleared the threshold (the curves' rows)."""
    curves: list[UnitCurve] = field(default_factory=list)
    """One restoration curve per unit kind."""
    direction: DirectionReport | None = None
    """The refusal direction's effects."""
    dynamic: dict[str, Any] = field(default_factory=dict)
    """Dynamic patching: refusal rate and score per n, jailbreak and control prompts."""
    generations: dict[str, list[str]] = field(default_factory=dict)
    """Greedy generations behind the refusal rates."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall-clock seconds per stage."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """What produced it (`patching.model.provenance.provenance`; the prompts are the suite, saved
    beside it as prompts.json)."""

    def summary(self) -> dict[str, Any]:
        return {"sites": self.sites, "refusal_rates": self.refusal_rates,
                "span_threshold": self.config.span_threshold, "n_pairs": len(self.pairs_used),
                "n_pairs_total": len(self.spans), "curves": [c.summary(self.config.overshoot_margin) for c in self.curves],
                "direction": None if self.direction is None else self.direction.summary(),
                "dynamic": self.dynamic, "seconds": self.seconds, "finding": self.paragraph()}

    def paragraph(self) -> str:
        """What was found, computed from the numbers (says "not reproduced" when it is not)."""
        n, threshold = len(self.pairs_used), self.config.span_threshold
        parts = [f"{n} of {len(self.spans)} pairs have a refusal-score span of at least {threshold:g} nats and enter the curves."]
        for curve in self.curves:
            s = curve.summary(self.config.overshoot_margin)
            if not s["n_pairs"]:
                continue
            p90, r90 = s["median_percent_for_90"], s["pairs_reaching_90"]
            p50, r50 = s["median_percent_for_50"], s["pairs_reaching_50"]
            text = (f"{curve.kind}: 50% restored at a median {_pct(p50)} of active units ({r50}/{n} pairs), "
                    f"90% at {_pct(p90)} ({r90}/{n} pairs)")
            if s["overshoot_points"]:
                text += f"; {s['overshoot_points']} points overshoot (max {s['max_fraction']:.2f})"
            parts.append(text + ".")
        neurons = next((c for c in self.curves if c.kind == "mlp_post@all layers"), None)
        if neurons is not None and neurons.pairs:
            parts.append(self._claim_sentence(neurons.summary(self.config.overshoot_margin), n))
        parts += self._direction_sentence() + self._dynamic_sentence()
        return " ".join(parts)

    @staticmethod
    def _claim_sentence(s: dict[str, Any], n: int) -> str:
        """Chen et al.'s claim against the all-layer neuron curve. Overshoot means the top neurons
        push the refusal score past the harmful run's own: the threshold is crossed without the
        behaviour being restored, so a curve that overshoots does not count as a reproduction."""
        met = s["median_percent_for_90"] is not None and s["median_percent_for_90"] <= 5 and 2 * s["pairs_reaching_90"] > n
        if met and s["overshoot_points"]:
            return (f"The claim that {CLAIM} is met on the numbers but not reproduced here for MLP neurons of every "
                    f"layer: {s['overshoot_points']} points of that curve overshoot (up to {s['max_fraction']:.2f} of the "
                    "span), so the top neurons act as a lever on the refusal score rather than restoring it.")
        return f"The claim that {CLAIM} is {'reproduced' if met else 'not reproduced'} here for MLP neurons of every layer."

    def _direction_sentence(self) -> list[str]:
        d = self.direction
        if d is None or d.best_layer is None:
            return []
        r = d.rates
        i = d.layers.index(d.best_layer)
        return [f"The refusal direction at layer {d.best_layer}: ablating it moves the harmful score "
                f"{d.harmful_score:.2f} → {d.ablated_score[i]:.2f} (refusal rate {r['harmful']:.2f} → "
                f"{r['harmful_ablated']:.2f}); adding it moves the harmless score {d.harmless_score:.2f} → "
                f"{d.added_score[i]:.2f} (refusal rate {r['harmless']:.2f} → {r['harmless_added']:.2f})."]

    def _dynamic_sentence(self) -> list[str]:
        rows = self.dynamic.get("rows")
        if not rows:
            return []
        base, best = rows[0], max(rows[1:], key=lambda r: r["jailbreak_refusal_rate"]) if len(rows) > 1 else rows[0]
        return [f"Dynamic patching of the top {best['n']} {self.dynamic['kind']} units "
                f"({best['percent_of_units']:.2g}%): jailbreak refusal rate {base['jailbreak_refusal_rate']:.2f} → "
                f"{best['jailbreak_refusal_rate']:.2f}, controls {base['control_refusal_rate']:.2f} → "
                f"{best['control_refusal_rate']:.2f}."]

    def to_dataframe(self) -> Any:
        """One row per (unit kind, percent): the median restored fraction and the pairs behind it."""
        import pandas as pd

        return pd.DataFrame([{"kind": curve.kind, "percent": percent, "median_fraction": value, "n_pairs": len(curve.pairs)}
                             for curve in self.curves for percent, value in zip(curve.percents, curve.median())])

    def plot(self, path: str | Path) -> Path:
        """Median restored fraction against percent of active units, one line per unit kind."""
        return plot_curves(self.curves, Path(path), title=f"refusal restoration ({self.model_name})")

    def save(self, path: str | Path, *, sae_sha256: str | None = None) -> Path:
        """report.json (figures, generations, provenance), prompts.json, curves.png, and the whole
        report for `load` (result.json + tensors), written into a temporary folder and swapped in
        whole (`sae.atomic.atomic_folder`): a crash never leaves a report beside another run's prompts.

        The SAE hashes come from the provenance recorded when the report was made; `sae_sha256=`
        (the old way to pass one in) is deprecated and only used for a report that has none."""
        folder = Path(path)
        record = self.provenance
        if sae_sha256 is not None:
            warn_deprecated("SafetyReport.save(sae_sha256=...)", "the provenance recorded by find_safety_latents")
            record = record or {"model": self.model_name, "saes": {site: sae_sha256 for site in self.sites}}
        report = {"summary": self.summary(), "spans": self.spans, "pairs_used": self.pairs_used,
                  "fractions": {c.kind: c.fraction.tolist() for c in self.curves}, "generations": self.generations,
                  "config": dataclasses.asdict(self.config), "provenance": record}
        with atomic_folder(folder, owned=REPORT_FILES) as tmp:
            self.plot(tmp / "curves.png")
            (tmp / "prompts.json").write_bytes(json.dumps(dataclasses.asdict(self.suite), indent=1).encode())
            (tmp / "report.json").write_bytes(json.dumps(report, indent=1).encode())
            tensors: dict[str, Any] = {}
            state = encode({**self.to_state(), "provenance": record}, tensors, "state")
            (tmp / TENSORS_FILE).write_bytes(save_safetensors_bytes(tensors))
            (tmp / RESULT_FILE).write_bytes(json.dumps({"format_version": FORMAT_VERSION, "type": class_name(SafetyReport),
                                                        "state": state}, indent=1, allow_nan=False).encode())
        return folder


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}%"


def plot_curves(curves: list[UnitCurve], path: Path, *, title: str) -> Path:
    """Median restored fraction against percent of active units, one line per unit kind (the
    direction, one unit per position, is a single point); thin lines per pair."""
    fig, ax = subplots(figsize=(7.5, 4.8))
    colors = ("tab:red", "tab:orange", "tab:blue", "tab:gray", "tab:green", "tab:purple")
    for curve, color in zip(curves, colors * 2):
        if not curve.pairs:
            continue
        for row in curve.fraction.tolist():
            ax.plot(curve.percents, row, color=color, alpha=0.15, linewidth=0.7)
        ax.plot(curve.percents, curve.median(), color=color, linewidth=2.2, marker="o", label=f"{curve.kind} (median)")
    ax.axhline(0.9, color="black", linestyle=":", linewidth=0.8)
    ax.axhline(0.5, color="black", linestyle=":", linewidth=0.8)
    ax.axhline(1.0, color="black", linewidth=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("units patched (% of active units)")
    ax.set_ylabel("fraction of refusal score restored (unclipped)")
    ax.set_title(title, fontsize=9)
    if any(curve.pairs for curve in curves):
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no pair cleared the span threshold", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
