"""`latentpatch heads`: attention-head patching on a prompt pair, in TransformerLens's layout.

Every head's `z` (or query, key, value, pattern, or its write to the residual stream) is patched, at every
position at once (`--by all`) or one position at a time (`--by position`), as TransformerLens's
`get_act_patch_attn_head_*` functions do, through the batched engine (`patch_heads`). Key and value units
are key/value heads on grouped-query models.
"""

from __future__ import annotations

import argparse
from typing import Any

from latentpatch.cli.common import SWEEP_JSON_OUTPUT, add_pair_command, check_out, describe_top, load_plain_model, pair_metric, report

KINDS = ("z", "q", "k", "v", "pattern", "head_out")


JSON_OUTPUT = {**SWEEP_JSON_OUTPUT,
    "kind": "what of each head was patched",
    "by": "all positions at once, or one position at a time",
}
"""The top-level keys of `--json`, documented on the docs' CLI page; a test holds the output to them."""


def register(sub: Any) -> None:
    """Add `heads` to the `latentpatch` parser."""
    p = add_pair_command(sub, "heads", "attention-head patching (z, q, k, v, pattern) on a prompt pair", sae=False,
                         description=__doc__.split("\n\n")[1])
    p.add_argument("--kind", choices=KINDS, default="z", help="what of each head is patched (default z)")
    p.add_argument("--by", choices=("all", "position"), default="all",
                   help="all positions at once (default) or one position at a time")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layers to patch (default: all)")
    p.set_defaults(run=run_heads, json_output=JSON_OUTPUT,
                   describe=lambda result: describe_top(result, f"Head patching ({result['kind']})"))


def run_heads(args: argparse.Namespace) -> dict[str, Any]:
    from patching import patch_heads

    check_out(args)
    model = load_plain_model(args.model)
    metric, align = pair_metric(args, model)
    result = patch_heads(model, args.clean, args.corrupted, metric, kind=args.kind, by=args.by,
                         direction=args.direction, layers=args.layers, align=align)
    return report(result, args, {"kind": args.kind, "by": args.by})
