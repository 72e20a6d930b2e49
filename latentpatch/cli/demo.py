"""`latentpatch demo`: the main job end to end on the default model, into an HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


JSON_OUTPUT = {
    "splice_metrics": "the evaluator's figures on the built-in sentences",
    "attribution": "AtP against exact patching (agreement)",
    "seconds": "wall-clock time", "section_seconds": "time per section",
    "report": "the report's index.html",
    "sweep": "the exact sweep's summary",
    "safety": "refusal rates, pairs used and the dynamic-patching rows",
    "findings": "the report's summary: key findings as sentences",
}
"""The top-level keys of `--json`, documented on the docs' CLI page."""


def register(sub: Any) -> None:
    """Add `demo` to the `latentpatch` parser."""
    demo = sub.add_parser("demo", help="the main job end to end on the default model, into an HTML report",
                          description="Use the shipped release SAE at a middle layer of SmolLM2-135M-Instruct (with "
                                      "--train, or at a --layer no release covers, train one here on the default corpus "
                                      "first, about 3 min on 2 CPU cores at the defaults, and say so), print its splice "
                                      "metrics, run a denoising sweep, attribution checked against exact patching, Top-1 "
                                      "vs Top-K steering and a safety restoration curve, and write index.html, its plots "
                                      "and results.json to --out.\n\n"
                                      "example: latentpatch demo --out latentpatch-output",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--out", type=Path, default=Path("latentpatch-output"), help="report folder (default: latentpatch-output)")
    demo.add_argument("--layer", type=int, default=15, help="resid_pre layer of the SAE (default: 15 of 30)")
    demo.add_argument("--d-sae", type=int, default=None,
                      help="dictionary size of an SAE trained here (--train, or a --layer no release covers; default 8 x 576)")
    demo.add_argument("--train-tokens", type=int, default=None,
                      help="activations an SAE trained here trains on (--train, or a --layer no release covers; default 600000)")
    demo.add_argument("--safety-pairs", type=int, default=3, help="refuse/comply pairs in the safety curve (default 3)")
    demo.add_argument("--train", action="store_true", help="train the demo SAE instead of using the shipped release SAE")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    demo.set_defaults(run=run_demo, json_output=JSON_OUTPUT, describe=describe)


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    from latentpatch.cli.common import UsageError
    from latentpatch.demo import DemoConfig, release_covers, run_demo as run
    from latentpatch.report import demo_summary
    from training.paths import check_output_folder

    shaping = {"d_sae": args.d_sae, "train_tokens": args.train_tokens}
    given = [f"--{name.replace('_', '-')}" for name, value in shaping.items() if value is not None]
    if given and not args.train and release_covers(args.layer):
        raise UsageError(f"latentpatch demo: {' and '.join(given)} shape an SAE trained here, but the shipped release SAE "
                         f"at layer {args.layer} is used: add --train to train one, or leave {' and '.join(given)} out")
    check_output_folder(args.out)
    config = DemoConfig(out=args.out, layer=args.layer, safety_pairs=args.safety_pairs, train=args.train,
                        **{name: value for name, value in shaping.items() if value is not None})
    results = run(config)
    brief = {key: results[key] for key in ("splice_metrics", "attribution", "seconds", "section_seconds", "report") if key in results}
    brief["sweep"] = {k: v for k, v in results.get("sweep", {}).items() if k != "top"}
    brief["safety"] = {k: results.get("safety", {}).get(k) for k in ("refusal_rates", "n_pairs", "dynamic")}
    brief["findings"] = demo_summary(results)
    return brief


def describe(brief: dict[str, Any]) -> str:
    """Five to ten lines for a person: how long it took, what was found, where the report is (`--json` for programs)."""
    steps = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in brief.get("section_seconds", {}).items())
    lines = [f"latentpatch demo: done in {brief['seconds'] / 60:.1f} min ({steps})"]
    lines += [f"  - {sentence}" for sentence in brief.get("findings", []) if not sentence.startswith("The whole run")]
    lines.append(f"report: {brief['report']} (plots and results.json beside it)")
    return "\n".join(lines)
