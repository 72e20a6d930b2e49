"""Benchmark: the units behind refusal on the default model, compared on the same pairs.

Over the built-in suite (30 harmful/harmless pairs in a few-shot chat context): for SAE latents,
MLP neurons (one layer and every layer), residual dimensions and the refusal direction, the median
percent of active units needed to restore 50% and 90% of the refusal score (over pairs whose span
clears the stated threshold) and how many pairs reach it; the refusal direction's ablation and
addition effects; dynamic activation patching refusal rates on jailbreak-wrapped harmful requests
and wrapped controls, without and with the top-n neurons copied from the plain request's run;
seconds per stage. The last line printed is one JSON object.

    python benchmarks/safety.py --sae DIR                      # an SAE folder
    python benchmarks/safety.py --release smollm2-135m-res --sae-id blocks.15.hook_resid_pre
    python benchmarks/safety.py --random-sae 15                # speed only: a random SAE at layer 15
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from patching import Site, load_model
from patching.safety import SafetyConfig, SafetySuite, find_safety_latents
from sae import load_sae


def load_the_sae(args: argparse.Namespace, model) -> tuple[object, str]:
    if args.sae:
        return load_sae(args.sae), str(args.sae)
    if args.release:
        import sae as sae_package

        if not hasattr(sae_package, "load_release"):
            raise SystemExit("this checkout has no sae.load_release: pass --sae DIR")
        return sae_package.load_release(args.release, args.sae_id), f"{args.release}/{args.sae_id}"
    from sae import SAEConfig, SparseAutoencoder

    site = Site(args.random_sae)
    cfg = SAEConfig(d_in=model.cfg.d_model, d_sae=args.d_sae, hook_name=site.hook_name, model_name=model.cfg.model_name)
    return SparseAutoencoder(cfg, generator=torch.Generator().manual_seed(0)), f"random@{site.hook_name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--sae", type=Path, help="SAE folder")
    which.add_argument("--release", help="shipped release name (with --sae-id)")
    which.add_argument("--random-sae", type=int, metavar="LAYER", help="a random SAE at this layer (speed only)")
    parser.add_argument("--sae-id", help="SAE id within --release, e.g. blocks.15.hook_resid_pre")
    parser.add_argument("--d-sae", type=int, default=4608, help="width of --random-sae")
    parser.add_argument("--max-pairs", type=int, default=None, help="at most this many pairs in the curves (default all)")
    parser.add_argument("--span-threshold", type=float, default=1.0, help="minimum refusal-score span (nats)")
    parser.add_argument("--direction-layers", type=int, nargs="+", default=None, help="default: every 3rd layer")
    parser.add_argument("--dynamic-ns", type=int, nargs="+", default=[10, 100, 1000, 4608])
    parser.add_argument("--templates", type=int, default=1, help="jailbreak wrappers used in dynamic patching")
    parser.add_argument("--n-layers", type=int, default=None, help="truncate the model (smoke runs only)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report (JSON + curves.png) here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(n_layers=args.n_layers)
    sae, name = load_the_sae(args, model)
    n_layers = model.cfg.n_layers
    layers = tuple(args.direction_layers) if args.direction_layers else tuple(range(0, n_layers, 3))
    config = SafetyConfig(max_pairs=args.max_pairs, span_threshold=args.span_threshold, direction_layers=layers,
                          dynamic_ns=tuple(args.dynamic_ns), jailbreak_templates=args.templates)
    suite = SafetySuite()
    start = time.perf_counter()
    report = find_safety_latents(model, sae, suite, config=config, progress=False)
    seconds = time.perf_counter() - start
    if args.out:
        report.save(args.out)
    summary = report.summary()
    print(f"refusal rates: {summary['refusal_rates']}")
    print(f"pairs in the curves: {summary['n_pairs']} of {summary['n_pairs_total']} (span >= {config.span_threshold})")
    for curve in summary["curves"]:
        print(f"{curve['kind']}: 50% at {curve['median_percent_for_50']}% ({curve['pairs_reaching_50']} pairs), "
              f"90% at {curve['median_percent_for_90']}% ({curve['pairs_reaching_90']} pairs), "
              f"overshoot points {curve['overshoot_points']}")
    for row in report.dynamic.get("rows", []):
        print(f"dynamic n={row['n']}: jailbreak {row['jailbreak_refusal_rate']:.2f}, control {row['control_refusal_rate']:.2f}")
    print(report.paragraph())
    direction = summary["direction"] or {}
    result = {
        "benchmark": "safety", "sae": name, "threads": args.threads, "n_layers": n_layers, "seconds": round(seconds, 1),
        "stage_seconds": summary["seconds"], "n_pairs": summary["n_pairs"], "span_threshold": config.span_threshold,
        "refusal_rates": summary["refusal_rates"],
        "units": {c["kind"]: {k: c[k] for k in ("median_percent_for_50", "pairs_reaching_50", "median_percent_for_90",
                                                 "pairs_reaching_90", "overshoot_points")} for c in summary["curves"]},
        "dynamic": report.dynamic.get("rows"),
        "direction": {k: direction.get(k) for k in ("best_layer", "harmful_score", "harmless_score", "rates")}
        | {"ablated_score": dict(zip(direction.get("layers", []), direction.get("ablated_score", []))),
           "added_score": dict(zip(direction.get("layers", []), direction.get("added_score", []))),
           "aligned": direction.get("aligned")},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
