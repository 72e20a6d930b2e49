"""`latentpatch attribute`: an attribution estimate (AtP, IG, GradDrop) on a prompt pair, optionally verified
by exact patching of its top units."""

from __future__ import annotations

import argparse
from typing import Any

from latentpatch.cli.common import SWEEP_JSON_OUTPUT, add_pair_command, COUNT_MAX, MAX_IG_STEPS, bounded_int, check_out, describe_top, load_for, pair_metric, report


JSON_OUTPUT = {**SWEEP_JSON_OUTPUT,
    "verification": "with --verify K: spearman, recall_at_k, k, max_missed_effect, n_checked; else null",
}
"""The top-level keys of `--json`, documented on the docs' CLI page; a test holds the output to them."""


def register(subparsers: Any) -> None:
    """Add `attribute` to the `latentpatch` parser."""
    p = add_pair_command(subparsers, "attribute", "attribution estimate (AtP / IG / GradDrop) on a prompt pair", sae=True)
    _options(p)
    p.set_defaults(run=run_attribute, json_output=JSON_OUTPUT, describe=describe_attribution)


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=("atp", "ig", "atp_gd"), default="atp", help="estimator (default atp)")
    p.add_argument("--steps", type=bounded_int(1, MAX_IG_STEPS), default=8, help="integrated-gradients path points (default 8)")
    p.add_argument("--verify", type=bounded_int(0, COUNT_MAX), default=0, metavar="K",
                   help="check the estimate by exact patching of its top K units and K random others")


def run_attribute(args: argparse.Namespace) -> dict[str, Any]:
    from patching import attribute_latents, verify

    check_out(args)
    sae, model = load_for(args.sae, args.model)
    metric, align = pair_metric(args, model)
    result = attribute_latents(model, sae, args.clean, args.corrupted, metric, method=args.method, steps=args.steps,
                               direction=args.direction, align=align)
    checked = verify(result, k=args.verify, random_k=args.verify).to_dict() if args.verify else None
    return report(result, args, {"verification": checked})


def describe_attribution(result: dict[str, Any]) -> str:
    """The estimate's top units, and how well exact patching of its top and random units agreed."""
    text = describe_top(result, f"Attribution ({result['method']}, estimated effects)")
    checked = result.get("verification")
    if checked:
        text += (f"\n\nChecked by exact patching of {checked['n_checked']} units: Spearman {checked['spearman']:.3f}, "
                 f"recall@{checked['k']} {checked['recall_at_k']:.2f}, largest missed effect {checked['max_missed_effect']:.3f}.")
    return text
