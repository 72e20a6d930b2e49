"""Saving an SAE evaluation: eval.json (SAEBench's grouped figures, per-latent arrays, provenance)
and two histograms (log10 feature density, max decoder |cos|), written as one atomic folder."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from patching.figures import subplots
from patching.splice.evaluation import SAEEvaluation
from sae.atomic import atomic_folder


EVAL_FILES = ("eval.json", "feature_density.png", "decoder_cosine.png")


def save_evaluation(result: SAEEvaluation, folder: Any, *, provenance: dict[str, Any] | None = None) -> Path:
    """Write eval.json (the figures, the per-latent densities and max cosines, `provenance`) and the
    two histograms into `folder`, atomically: a reader sees the old save or the whole new one."""
    body = {**result.to_dict(), "provenance": dict(provenance or {}),
            "per_latent": {"feature_density": result.feature_density.tolist(),
                           "max_decoder_cosine": [None if math.isnan(v) else v for v in result.max_decoder_cosine.tolist()]}}
    with atomic_folder(folder, owned=EVAL_FILES) as tmp:
        (tmp / "eval.json").write_text(json.dumps(body, indent=1, allow_nan=False) + "\n")
        _density_plot(result, tmp / "feature_density.png")
        _cosine_plot(result, tmp / "decoder_cosine.png")
    return Path(folder)


def _density_plot(result: SAEEvaluation, path: Path) -> None:
    alive = result.feature_density[result.feature_density > 0].double()
    fig, ax = subplots(figsize=(6, 3.5))
    ax.hist(alive.log10().numpy(), bins=50)
    ax.axvline(math.log10(result.dense_threshold), color="red", linestyle="--", label=f"dense > {result.dense_threshold:g}")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(f"{result.site}: {result.frac_dead:.1%} dead (not shown), {result.frac_dense:.1%} dense, "
                 f"{result.n_tokens} tokens", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _cosine_plot(result: SAEEvaluation, path: Path) -> None:
    values = result.max_decoder_cosine[~result.max_decoder_cosine.isnan()]
    fig, ax = subplots(figsize=(6, 3.5))
    ax.hist(values.numpy(), bins=50, range=(0, 1))
    ax.set_xlabel("max |cos| of a decoder row with any other row")
    ax.set_ylabel("latents")
    ax.set_title(f"{result.site}: mean {result.decoder_cosine['mean']:.3f}, "
                 f"median {result.decoder_cosine['median']:.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
