"""`latentpatch patch`: an exact latent-patching sweep on a prompt pair."""

from __future__ import annotations

import argparse
from typing import Any

from latentpatch.cli.common import add_pair_options, add_sae_options, check_out, describe_top, load_for, pair_metric, report


def register(subparsers: Any) -> None:
    """Add `patch` to the `latentpatch` parser."""
    raw = argparse.RawDescriptionHelpFormatter
    helptext = "exact latent patching sweep on a prompt pair"
    p = subparsers.add_parser("patch", help=helptext, formatter_class=raw, description=helptext + ".\n\nexample: "
                              "latentpatch patch runs/sae-l15 --clean 'The Eiffel Tower is located in the city of' "
                              "--corrupted 'The Colosseum is located in the city of' --answer ' Paris' --wrong ' Rome' "
                              "--out results/eiffel")
    add_sae_options(p)
    add_pair_options(p)
    _options(p)
    p.set_defaults(run=run_patch, describe=lambda result: describe_top(result, "Exact latent patching"))


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
