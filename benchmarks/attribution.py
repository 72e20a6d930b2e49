"""Benchmark: attribution estimates (AtP, IG, AtP*-GradDrop) against the exact latent sweep.

On the default model with an SAE at a middle layer, for a factual pair (Eiffel Tower /
Colosseum → " Paris" vs " Rome") and an IOI pair (… John gave a drink to / … Mary gave a drink
to → " Mary" vs " John"), it measures in one run: the cost of AtP in forward-pass equivalents
(AtP time ÷ one forward pass), the exact sweep's time over the same units, and for each
estimator the Spearman correlation with the exact effects over the 50 units with the largest
exact effect, recall@50 over all units, and the largest exact effect among units the estimate
ranks below 50. The last line printed is one JSON object.

    python benchmarks/attribution.py [--sae DIR] [--layer 15] [--ig-steps 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from _common import benchmark_sae

from patching import LogitDiff, attribute_latents, load_model, patch_latents
from patching.attribution.verify import spearman

PAIRS = {
    "factual": ("The Eiffel Tower is located in the city of", "The Colosseum is located in the city of", " Paris", " Rome"),
    "ioi": ("When Mary and John went to the store, John gave a drink to",
            "When Mary and John went to the store, Mary gave a drink to", " Mary", " John"),
}
TOP = 50


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def agreement(estimate, exact) -> dict[str, float]:
    est, truth = estimate.mean_effect, exact.mean_effect
    signed = estimate.method != "atp_gd"
    top_exact = torch.argsort(truth.abs(), descending=True)[:TOP]
    rank_est = torch.argsort(est.abs(), descending=True)
    top_est = set(rank_est[:TOP].tolist())
    low = rank_est[TOP:]
    a, b = (est[top_exact], truth[top_exact]) if signed else (est[top_exact].abs(), truth[top_exact].abs())
    return {"spearman_top50": round(spearman(a, b), 4),
            "recall_at_50": round(len(top_est & set(top_exact.tolist())) / TOP, 4),
            "max_missed_effect": round(truth[low].abs().max().item() if low.numel() else 0.0, 4)}


def run_pair(model, sae, name, ig_steps):
    clean, corrupted, answer, wrong = PAIRS[name]
    metric = LogitDiff(model.to_single_token(answer), model.to_single_token(wrong))
    tokens = model.to_tokens(corrupted)
    with torch.inference_mode():
        model(tokens)
        forward_s = statistics.median(timed(lambda: model(tokens))[1] for _ in range(5))
    attribute_latents(model, sae, clean, corrupted, metric, progress=False)  # warm-up
    atp_times, atp = [], None
    for _ in range(3):
        atp, seconds = timed(lambda: attribute_latents(model, sae, clean, corrupted, metric, progress=False))
        atp_times.append(seconds)
    atp_s = statistics.median(atp_times)
    ig, ig_s = timed(lambda: attribute_latents(model, sae, clean, corrupted, metric, method="ig", steps=ig_steps, progress=False))
    gd, gd_s = timed(lambda: attribute_latents(model, sae, clean, corrupted, metric, method="atp_gd", progress=False))
    exact, exact_s = timed(lambda: patch_latents(model, sae, clean, corrupted, metric, units=atp.units, progress=False))
    return {
        "pair": name, "units": len(atp.units), "m_clean": round(exact.metric_clean[0].item(), 4),
        "m_corrupted": round(exact.metric_corrupted[0].item(), 4), "forward_s": round(forward_s, 4),
        "atp_s": round(atp_s, 4), "atp_forward_equivalents": round(atp_s / forward_s, 2),
        "ig_s": round(ig_s, 3), "atp_gd_s": round(gd_s, 3), "exact_sweep_s": round(exact_s, 3),
        "atp": agreement(atp, exact), "ig": agreement(ig, exact), "atp_gd": agreement(gd, exact),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sae", help="SAE folder or release id RELEASE/SAE_ID (default: seeded random TopK SAE, k=64, d_sae=4608)")
    parser.add_argument("--layer", type=int, default=15, help="resid_pre layer of the random SAE (default 15)")
    parser.add_argument("--ig-steps", type=int, default=8, help="integrated-gradients path points (default 8)")
    args = parser.parse_args()
    model = load_model()
    sae = benchmark_sae(model, args.sae, args.layer)
    rows = [run_pair(model, sae, name, args.ig_steps) for name in PAIRS]
    for row in rows:
        print(f"{row['pair']:8s} units {row['units']:5d}  AtP {row['atp_forward_equivalents']:5.2f} forward-equivalents "
              f"({row['atp_s']:.3f} s vs exact sweep {row['exact_sweep_s']:.2f} s)")
        for method in ("atp", "ig", "atp_gd"):
            print(f"    {method:7s} {row[method]}")
    print(json.dumps({"benchmark": "attribution", "site": sae.cfg.hook_name, "d_sae": sae.cfg.d_sae,
                      "sae": args.sae or "random-topk64", "ig_steps": args.ig_steps,
                      "torch_threads": torch.get_num_threads(), "pairs": rows}))


if __name__ == "__main__":
    main()
