"""`latentpatch residual`: the raw residual-stream trace of a prompt pair, one patch per (layer, position).

Every `resid_pre` activation at every layer and position is patched from one run into the other by the
batched engine (`patch_residual`); the heatmap shows where the behaviour's information sits.
"""

from __future__ import annotations

import argparse
from typing import Any

from latentpatch.cli.common import add_model_option, add_pair_options, check_out, describe_top, load_plain_model, pair_metric, report

EXAMPLE = ("example: latentpatch residual --clean 'The Eiffel Tower is located in the city of' "
           "--corrupted 'The Colosseum is located in the city of' --answer ' Paris' --wrong ' Rome' --out results/residual")


def register(sub: Any) -> None:
    """Add `residual` to the `latentpatch` parser."""
    p = sub.add_parser("residual", help="raw residual trace (layer x position) on a prompt pair",
                       description=__doc__.split("\n\n")[1] + "\n\n" + EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_option(p)
    add_pair_options(p)
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layers to patch (default: all)")
    p.set_defaults(run=run_residual, describe=lambda result: describe_top(result, "Residual trace"))


def run_residual(args: argparse.Namespace) -> dict[str, Any]:
    from patching import patch_residual

    check_out(args)
    model = load_plain_model(args.model)
    metric, align = pair_metric(args, model)
    result = patch_residual(model, args.clean, args.corrupted, metric, direction=args.direction, layers=args.layers,
                            align=align)
    return report(result, args, {})
