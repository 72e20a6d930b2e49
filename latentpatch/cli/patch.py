"""`latentpatch patch`: an exact latent-patching sweep on a prompt pair."""

from __future__ import annotations

import argparse
from typing import Any

from latentpatch.cli.common import SWEEP_JSON_OUTPUT, add_pair_command, check_out, describe_top, load_for, pair_metric, report


JSON_OUTPUT = SWEEP_JSON_OUTPUT
"""The top-level keys of `--json`, documented on the docs' CLI page; a test holds the output to them."""


def register(subparsers: Any) -> None:
    """Add `patch` to the `latentpatch` parser."""
    p = add_pair_command(subparsers, "patch", "exact latent patching sweep on a prompt pair", sae=True)
    _options(p)
    p.set_defaults(run=run_patch, json_output=JSON_OUTPUT, describe=lambda result: describe_top(result, "Exact latent patching"))


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unit", choices=("latent_position", "latent", "position", "error"), default="latent_position",
                   help="what one patch changes (default: each differing latent at each position)")


def run_patch(args: argparse.Namespace) -> dict[str, Any]:
    from patching import patch_latents

    check_out(args)
    sae, model = load_for(args.sae, args.model)
    metric, align = pair_metric(args, model)
    result = patch_latents(model, sae, args.clean, args.corrupted, metric, direction=args.direction, units=args.unit,
                           align=align)
    return report(result, args, {})
