"""`latentpatch heads`: attention-head patching on a prompt pair, in TransformerLens's layout.

Every head's `z` (or query, key, value, pattern, or its write to the residual stream) is patched, at every
position at once (`--by all`) or one position at a time (`--by position`), as TransformerLens's
`get_act_patch_attn_head_*` functions do, through the batched engine (`patch_heads`). Key and value units
are key/value heads on grouped-query models.
"""

from __future__ import annotations

import argparse
from typing import Any

from latentpatch.cli.common import add_model_option, add_pair_options, check_out, describe_top, load_plain_model, pair_metric, report

EXAMPLE = ("example: latentpatch heads --clean 'When Mary and John went to the store, John gave a drink to' "
           "--corrupted 'When Mary and John went to the store, Mary gave a drink to' --answer ' Mary' --wrong ' John' "
           "--kind z --out results/heads")
KINDS = ("z", "q", "k", "v", "pattern", "head_out")


def register(sub: Any) -> None:
    """Add `heads` to the `latentpatch` parser."""
    p = sub.add_parser("heads", help="attention-head patching (z, q, k, v, pattern) on a prompt pair",
                       description=__doc__.split("\n\n")[1] + "\n\n" + EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_option(p)
    add_pair_options(p)
    p.add_argument("--kind", choices=KINDS, default="z", help="what of each head is patched (default z)")
    p.add_argument("--by", choices=("all", "position"), default="all",
                   help="all positions at once (default) or one position at a time")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layers to patch (default: all)")
    p.set_defaults(run=run_heads, describe=lambda result: describe_top(result, f"Head patching ({result['kind']})"))


def run_heads(args: argparse.Namespace) -> dict[str, Any]:
    from patching import patch_heads

    check_out(args)
    model = load_plain_model(args.model)
    metric, align = pair_metric(args, model)
    result = patch_heads(model, args.clean, args.corrupted, metric, kind=args.kind, by=args.by,
                         direction=args.direction, layers=args.layers, align=align)
    return report(result, args, {"kind": args.kind, "by": args.by})
