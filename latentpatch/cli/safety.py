"""`latentpatch safety`: the SAE latents behind refusals on the built-in suite."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from latentpatch.cli.common import add_sae_options, check_out, load_for


JSON_OUTPUT = {
    "saved_to": "the report folder (--out)",
    "sites": "the SAE's hook names",
    "refusal_rates": "refusal rates of the harmful and harmless prompts",
    "span_threshold": "the refusal-score span a pair needs to enter the curves",
    "n_pairs": "pairs that entered the curves",
    "n_pairs_total": "pairs scored",
    "curves": "one summary per restoration curve (latents, neurons, residual dimensions)",
    "direction": "the refusal direction's restoration, or null",
    "dynamic": "dynamic activation patching rows, or null",
    "seconds": "wall-clock time",
    "finding": "what was found, in sentences computed from the numbers",
}
"""The top-level keys of `--json`, documented on the docs' CLI page."""


def register(subparsers: Any) -> None:
    """Add `safety` to the `latentpatch` parser."""
    raw = argparse.RawDescriptionHelpFormatter
    sf = subparsers.add_parser("safety", help="safety latents: refusal rates, restoration curves, dynamic patching",
                               formatter_class=raw, description="Find the SAE latents behind refusals on the built-in "
                               "suite and write report.json, prompts.json and curves.png.\n\n"
                               "example: latentpatch safety runs/sae-l15 --max-pairs 8 --out results/safety")
    add_sae_options(sf)
    sf.add_argument("--out", type=Path, required=True, help="folder for the report")
    sf.add_argument("--max-pairs", type=int, default=None, help="use at most this many refuse/comply pairs (default: all)")
    sf.add_argument("--percents", type=float, nargs="+", default=None,
                    help="percents of active units at which each restoration curve is measured")
    sf.set_defaults(run=run_safety, json_output=JSON_OUTPUT)



def run_safety(args: argparse.Namespace) -> dict[str, Any]:
    from patching.safety.search import SafetyConfig, find_safety_latents
    from patching.safety.prompts import SafetySuite

    check_out(args)
    sae, model = load_for(args.sae, args.model)
    suite = SafetySuite()
    overrides = {"percents": tuple(args.percents)} if args.percents else {}
    report = find_safety_latents(model, sae, suite, config=SafetyConfig(max_pairs=args.max_pairs, **overrides))
    report.save(args.out)
    return {"saved_to": str(args.out), **report.summary()}
