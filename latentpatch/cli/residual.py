"""`latentpatch residual`: the raw residual-stream trace of a prompt pair, one patch per (layer, position).

Every `resid_pre` activation at every layer and position is patched from one run into the other by the
batched engine (`patch_residual`); the heatmap shows where the behaviour's information sits.
"""

from __future__ import annotations

import argparse
from typing import Any

from latentpatch.cli.common import SWEEP_JSON_OUTPUT, add_pair_command, check_out, describe_top, load_plain_model, pair_metric, report


JSON_OUTPUT = SWEEP_JSON_OUTPUT
"""The top-level keys of `--json`, documented on the docs' CLI page; a test holds the output to them."""


def register(sub: Any) -> None:
    """Add `residual` to the `latentpatch` parser."""
    p = add_pair_command(sub, "residual", "raw residual trace (layer x position) on a prompt pair", sae=False,
                         description=__doc__.split("\n\n")[1])
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layers to patch (default: all)")
    p.set_defaults(run=run_residual, json_output=JSON_OUTPUT, describe=lambda result: describe_top(result, "Residual trace"))


def run_residual(args: argparse.Namespace) -> dict[str, Any]:
    from patching import patch_residual

    check_out(args)
    model = load_plain_model(args.model)
    metric, align = pair_metric(args, model)
    result = patch_residual(model, args.clean, args.corrupted, metric, direction=args.direction, layers=args.layers,
                            align=align)
    return report(result, args, {})
