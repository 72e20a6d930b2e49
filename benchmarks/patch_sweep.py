"""Benchmark: a full latent-patching sweep against the naive one-forward-per-patch method.

On the default model with an SAE at a middle layer and an equal-length factual pair
("The Eiffel Tower …" / "The Colosseum …", answers " Paris" / " Rome"), it times
`patch_latents` (denoise, every differing latent at every position) and the naive method that
TransformerLens's `generic_activation_patch` and feature-circuits' exact mode use: one full
forward pass per patch, the patch applied by a hook. Both run in this process on the same
units; the last line printed is one JSON object with the figures.

    python benchmarks/patch_sweep.py [--sae DIR] [--layer 15] [--naive-sample N]

Without --sae a TopK SAE (k=64, d_sae=4608) with a seeded random initialisation is used: the
engine's cost depends on how many latents differ, not on what they mean.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

import torch
from _common import benchmark_sae

from patching import LogitDiff, Site, load_model, patch_latents

CLEAN = "The Eiffel Tower is located in the city of"
CORRUPTED = "The Colosseum is located in the city of"


def naive_sweep(model, sae, site, clean_tokens, corrupted_tokens, units, metric):
    """One full forward per unit; the hook re-encodes and writes the patched latent's change."""
    _, cache = model.run_with_cache(clean_tokens, names_filter=site.hook_name)
    z_clean = sae.encode(cache[site.hook_name])[0]
    values = []
    for unit in units:
        p, latent = unit.position, unit.latent

        def hook(x, hook, p=p, latent=latent):
            z = sae.encode(x[:, p])[:, latent]
            x = x.clone()
            x[:, p] += (z_clean[p, latent] - z)[:, None] * sae.W_dec[latent]
            return x

        logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[(site.hook_name, hook)])
        values.append(metric(logits[:, -1], torch.tensor([0]))[0])
    return torch.stack(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sae", help="SAE folder (default: seeded random TopK SAE)")
    parser.add_argument("--layer", type=int, default=15, help="resid_pre layer of the random SAE (default 15)")
    parser.add_argument("--naive-sample", type=int, default=None,
                        help="time the naive method on this many random units and extrapolate (default: all units)")
    args = parser.parse_args()

    model = load_model()
    sae = benchmark_sae(model, args.sae, args.layer)
    site = Site.from_hook_name(sae.cfg.hook_name)
    metric = LogitDiff(model.to_single_token(" Paris"), model.to_single_token(" Rome"))
    clean, corrupted = model.to_tokens(CLEAN), model.to_tokens(CORRUPTED)
    assert clean.shape == corrupted.shape, "the benchmark pair must have equal token lengths"

    with torch.inference_mode():
        model(clean)  # warm-up
        start = time.perf_counter()
        result = patch_latents(model, sae, clean, corrupted, metric, progress=False)
        ours_s = time.perf_counter() - start

        units = result.units
        sample = list(range(len(units)))
        if args.naive_sample is not None and args.naive_sample < len(units):
            sample = sorted(random.Random(0).sample(sample, args.naive_sample))
        start = time.perf_counter()
        naive_values = naive_sweep(model, sae, site, clean, corrupted, [units[i] for i in sample], metric)
        naive_sample_s = time.perf_counter() - start
    naive_s = naive_sample_s * len(units) / len(sample)
    span = result.metric_clean[0] - result.metric_corrupted[0]
    naive_effect = (naive_values - result.metric_corrupted[0]) / span
    max_diff = (naive_effect - result.effect[0, sample]).abs().max().item()

    figures = {
        "benchmark": "patch_sweep", "model": model.cfg.model_name, "site": site.hook_name, "d_sae": sae.cfg.d_sae,
        "units": len(units), "positions": clean.shape[1], "ours_s": round(ours_s, 3), "naive_s": round(naive_s, 3),
        "naive_extrapolated_from": len(sample), "speedup": round(naive_s / ours_s, 2),
        "max_abs_effect_diff": max_diff, "m_clean": result.metric_clean[0].item(),
        "m_corrupted": result.metric_corrupted[0].item(), "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    print(f"{len(units)} differing (latent, position) units at {site.hook_name}")
    print(f"ours  {ours_s:8.2f} s   naive {naive_s:8.2f} s   speed-up {naive_s / ours_s:6.1f}x   max |Δeffect| {max_diff:.2e}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
