"""Benchmark: are SAE latents cleaner than MLP neurons, and how many of each does a behaviour need?

On the default model with an SAE at a middle layer (`--sae`: a folder or a release id): at the MLP
input (`blocks.L.hook_resid_mid`) the neurons compared are MLP L's, which read that site; at a block
input (`blocks.L.hook_resid_pre`, release v2's sites) they are MLP L-1's, the last MLP that writes into it.

1. Monosemanticity, one formula for both (`patching.inspect.neurons.token_concentration`, 1 - H/log N of
   the tokens at a unit's top N contexts over the scoring text): the median over the top-k
   neurons (`mlp_post`, ranked by their largest activation) against the top-k latents (same
   ranking), and over every unit with N positive contexts. For the top-k neurons also the
   cluster score (where the SAE reads what the neurons read, `resid_mid`): the fraction of their top
   contexts that share one dominant SAE latent.
2. Paris/Rome: clean "The Eiffel Tower is located in the city of", corrupted "The Colosseum is
   located in the city of", metric LogitDiff(" Paris", " Rome"). Units ranked by AtP are
   patched jointly and exactly (denoising) at every position; the smallest n of (position, unit)
   elements restoring 50% / 90% of the effect, for SAE latents, the compared MLP neurons
   and residual dimensions at the SAE's site (`patching.attribution.restoration`); also the latents patched
   together with the SAE's error node at every position (the error carries what the SAE misses).

The last line printed is one JSON object. With `--out DIR` it also writes the restoration plot
and dashboards for the top-5 neurons and latents.

    python benchmarks/polysemanticity.py --sae runs/sae-l12-mid [--k 20] [--n-top 20] [--out DIR]
    python benchmarks/polysemanticity.py --sae smollm2-135m-res-v2/blocks.15.hook_resid_pre
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from patching import DEFAULT_MODEL, LogitDiff, Site, load_model
from patching.attribution.restoration import RestorationCurve, latent_restoration, raw_restoration
from patching.inspect.neuron_cards import NeuronConfig, inspect_units, unit_scores
from patching.inspect.neurons import Neuron
from patching.model import tl_compat
from latentpatch.cli.common import resolve_sae
from sae.metrics import median
from sae.files import weights_sha256

CLEAN = "The Eiffel Tower is located in the city of"
CORRUPTED = "The Colosseum is located in the city of"
COUNTS = (1, 2, 3, 5, 8, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000, 20000)


def top_k_median(scores: torch.Tensor, ranking: torch.Tensor, k: int) -> tuple[float | None, list[int]]:
    """Median score of the k units with the largest `ranking` among those with a score."""
    eligible = torch.nonzero(~scores.isnan()).flatten()
    chosen = eligible[torch.argsort(ranking[eligible], descending=True)[:k]].tolist()
    return (statistics.median(scores[chosen].tolist()) if chosen else None), chosen


def neuron_layer_for(site: Site, mlp_input: str) -> int:
    """The MLP whose neurons are compared with the SAE's latents: the one reading the site, or for a
    block input the one writing into it last (then no cluster score: the SAE does not read what the
    neurons read)."""
    if site.kind == mlp_input:
        return site.layer
    if site.kind == "resid_pre" and site.layer >= 1:
        return site.layer - 1
    raise SystemExit(f"the SAE is at {site.hook_name}; compare neurons with an SAE at a block's {mlp_input} "
                     "or at hook_resid_pre of a block after the first")


def nanmedian(values: torch.Tensor) -> float | None:
    kept = values[~values.isnan()]
    return float(median(kept)) if kept.numel() else None


def restoration(model, site, sae, layer):
    clean, corrupted = tl_compat.to_tokens(model, CLEAN), tl_compat.to_tokens(model, CORRUPTED)
    metric = LogitDiff(model.to_single_token(" Paris"), model.to_single_token(" Rome"))
    with torch.inference_mode():
        m_clean = metric(tl_compat.forward_logits(model, clean)[:, -1], torch.tensor([0])).item()
        m_corrupted = metric(tl_compat.forward_logits(model, corrupted)[:, -1], torch.tensor([0])).item()
    latents = latent_restoration(model, sae, clean, corrupted, metric, COUNTS, 0, site=site)
    with_error = latent_restoration(model, sae, clean, corrupted, metric, COUNTS, 0, with_error=True, site=site)
    neurons = raw_restoration(model, Site(layer, "mlp_post"), clean, corrupted, metric, COUNTS, 0)
    dims = raw_restoration(model, site, clean, corrupted, metric, COUNTS, 0)
    curves = {"SAE latents": RestorationCurve(list(COUNTS), latents.fraction[None], [latents.n_active]),
              "SAE latents + error node": RestorationCurve(list(COUNTS), with_error.fraction[None], [latents.n_active]),
              "MLP neurons (mlp_post)": RestorationCurve(list(COUNTS), neurons.fraction[None], [neurons.n_elements]),
              "residual dimensions": RestorationCurve(list(COUNTS), dims.fraction[None], [dims.n_elements])}
    summary = {"logit_diff_clean": round(m_clean, 4), "logit_diff_corrupted": round(m_corrupted, 4),
               "latent_full_patch_fraction": round(latents.full, 4)}
    names = (("SAE latents", "latents"), ("SAE latents + error node", "latents_with_error"),
             ("MLP neurons (mlp_post)", "neurons"), ("residual dimensions", "resid_dims"))
    for name, key in names:
        curve = curves[name]
        summary[f"{key}_needed_50"] = curve.needed_count(0.5)[0]
        summary[f"{key}_needed_90"] = curve.needed_count(0.9)[0]
        summary[f"{key}_max_fraction"] = round(float(curve.fraction.max()), 4)
        summary[f"{key}_fraction_by_count"] = [round(v, 4) for v in curve.fraction[0].tolist()]
    summary["elements_available"] = {"latents_active": latents.n_active, "neurons": neurons.n_elements,
                                     "resid_dims": dims.n_elements}
    return summary, curves, latents.scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sae", required=True, help="SAE folder or release id at blocks.L.hook_resid_mid or "
                                                     "blocks.L.hook_resid_pre (L >= 1) of the default model")
    parser.add_argument("--k", type=int, default=20, help="top-k units compared (default 20)")
    parser.add_argument("--n-top", type=int, default=20, help="top contexts per unit scored (default 20)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the restoration plot and dashboards")
    parser.add_argument("--text", choices=("real", "generated"), default="real",
                        help="contexts scored: 'real', the first --rows rows of 128 tokens of the real corpora's "
                             "held-out split (no SAE trains on it; default), or 'generated', the self-generated corpus")
    parser.add_argument("--rows", type=int, default=160, help="held-out rows with --text real (default 160)")
    args = parser.parse_args()
    torch.manual_seed(0)
    from training.data.generated import default_texts
    from training.data.heldout import heldout_tokens

    start = time.perf_counter()
    model = load_model()
    model.eval()
    sae = resolve_sae(args.sae)
    site = Site.from_hook_name(sae.cfg.hook_name).check(model)
    neuron_layer = neuron_layer_for(site, tl_compat.mlp_input_kind(model))
    if args.text == "real":
        texts = heldout_tokens(model, corpus="real", n_rows=args.rows)  # (rows, 128) token rows
        text_name = f"real corpora, held-out split, first {args.rows} rows of 128 tokens"
    else:
        texts = list(default_texts()())
        text_name = f"self-generated corpus, {len(texts)} texts"
    scores = unit_scores(model, sae, neuron_layer, texts, k=args.n_top)
    neuron_median, top_neurons = top_k_median(scores.neurons, scores.neuron_max, args.k)
    latent_median, top_latents = top_k_median(scores.latents, scores.latent_max, args.k)
    # The cluster score decomposes a neuron's contexts by the latents of an SAE at the site the neuron
    # reads; an SAE at a block input sits after the MLP, not before it, so there it is not computed.
    reads_site = site.kind == tl_compat.mlp_input_kind(model)
    reports = (inspect_units(model, sae, [Neuron(neuron_layer, i) for i in top_neurons], texts, config=NeuronConfig(k=args.n_top))
               if reads_site else [])
    clusters = [r.cluster_score for r in reports if r.cluster_score is not None]
    paris, curves, latent_scores = restoration(model, site, sae, neuron_layer)
    if args.out is not None:
        write_figures(args.out, model, sae, site, texts, curves, reports[:5], top_latents[:5], text_name)
    result = {
        "benchmark": "polysemanticity", "model": DEFAULT_MODEL, "sae": str(args.sae), "sae_sha256": weights_sha256(sae),
        "site": site.hook_name, "neurons": f"blocks.{neuron_layer}.mlp.hook_post", "d_sae": sae.d_sae, "d_mlp": tl_compat.d_mlp(model), "corpus": text_name, "corpus_texts": len(texts),
        "corpus_tokens": scores.n_tokens, "k": args.k, "n_top": args.n_top,
        "median_token_score_top_k_neurons": neuron_median, "median_token_score_top_k_latents": latent_median,
        "median_token_score_all_neurons": nanmedian(scores.neurons), "median_token_score_all_latents": nanmedian(scores.latents),
        "n_scored_neurons": int((~scores.neurons.isnan()).sum()), "n_scored_latents": int((~scores.latents.isnan()).sum()),
        "median_cluster_score_top_k_neurons": statistics.median(clusters) if clusters else None,
        "median_groups_top_k_neurons": statistics.median([len(r.groups) for r in reports]) if reports else None,
        "paris_rome": paris, "seconds": round(time.perf_counter() - start, 1), "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


def write_figures(out: Path, model, sae, site, texts, curves, neuron_reports, latents, text_name) -> None:
    from patching.attribution.plots import plot_restoration_curves
    from patching.inspect.dashboards import write_dashboards
    from patching.inspect.latents import inspect_latents

    out.mkdir(parents=True, exist_ok=True)
    plot_restoration_curves(curves, out / "paris_rome_restoration.png", x="count",
                            title=f"Paris/Rome logit difference restored, {site.hook_name}",
                            ylabel="fraction of LogitDiff(Paris, Rome) restored")
    latent_reports = inspect_latents(model, sae, latents, texts) if latents else []
    write_dashboards(out / "dashboards", neuron_reports + latent_reports, title=f"top units at {site.hook_name}",
                     provenance={"model": DEFAULT_MODEL, "sae_sha256": weights_sha256(sae), "site": site.hook_name,
                                 "corpus": text_name})


if __name__ == "__main__":
    main()
