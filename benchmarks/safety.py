"""Benchmark: how few SAE latents restore a refusal, against residual dimensions.

On the default model with a trained SAE (default: the demo SAE, trained and cached on first use),
over the built-in suite's pairs where the model refuses the harmful request and answers its
harmless twin: the percent of active latents needed to restore 50% and 90% of the refusal score
(median over pairs), the same for residual dimensions at the SAE's site, and the refusal rate on
the complying prompts with and without the top latents clamped during generation. The last line
printed is one JSON object.

    python benchmarks/safety.py [--sae DIR] [--max-pairs 12] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from latentpatch.demo import DemoConfig, demo_sae
from patching import load_model
from patching.safety.prompts import SafetySuite
from patching.safety.search import find_safety_latents
from sae import load_sae
from sae.files import weights_sha256

COUNTS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sae", help="SAE folder (default: the demo SAE, trained on first use)")
    parser.add_argument("--max-pairs", type=int, default=12, help="refuse/comply pairs to analyse (default 12)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report (JSON + curves.png) here")
    args = parser.parse_args()
    sae = load_sae(args.sae) if args.sae else demo_sae(DemoConfig())
    model = load_model()
    suite = SafetySuite()
    start = time.perf_counter()
    report = find_safety_latents(model, sae, suite, counts=COUNTS, max_pairs=args.max_pairs)
    seconds = time.perf_counter() - start
    if args.out:
        report.save(args.out, model_name=model.cfg.model_name, sae_sha256=weights_sha256(sae), suite=suite)
    summary = report.summary()
    latents, raw = summary["latents"] or {}, summary["raw"] or {}
    print(f"refusal rates: {summary['refusal_rates']}")
    print(f"pairs used: {summary['n_pairs']}")
    print(f"latents: 50% at {latents.get('median_percent_for_50')}% of active, 90% at {latents.get('median_percent_for_90')}%")
    print(f"residual dims: 50% at {raw.get('median_percent_for_50')}%, 90% at {raw.get('median_percent_for_90')}%")
    print(f"dynamic patching: {summary['dynamic']}")
    print(json.dumps({"benchmark": "safety", "site": sae.cfg.hook_name, "sae": args.sae or "demo",
                      "seconds": round(seconds, 1), **summary}))


if __name__ == "__main__":
    main()
