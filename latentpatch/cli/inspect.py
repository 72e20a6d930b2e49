"""`latentpatch inspect`: validate and describe an SAE (a folder, ours or SAELens's, or a shipped release id)."""

from __future__ import annotations

import argparse
from typing import Any

from latentpatch.cli.common import SAE_HELP


JSON_OUTPUT = {
    "path": "the SAE as named on the command line",
    "config": "its cfg.json as SAELens 6 reads it",
    "statistics": "decoder-norm range, b_enc mean, b_dec norm, parameter count",
}
"""The top-level keys of `--json`, documented on the docs' CLI page; a test holds the output to them."""


def register(sub: Any) -> None:
    """Add `inspect` to the `latentpatch` parser."""
    inspect = sub.add_parser("inspect", help="print an SAE folder's config and weight statistics",
                             description="Validate and describe an SAE folder (ours or SAELens's).\n\n"
                                         "example: latentpatch inspect runs/sae-l15 --json",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    inspect.add_argument("path", metavar="sae", help=SAE_HELP)
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    inspect.set_defaults(run=run_inspect, json_output=JSON_OUTPUT)


def run_inspect(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from latentpatch.cli.common import resolve_sae
    from sae.files import config_to_dict

    sae = resolve_sae(args.path)
    with torch.no_grad():
        norms = sae.decoder_norms()
        stats = {"decoder_norm_min": norms.min().item(), "decoder_norm_mean": norms.mean().item(),
                 "decoder_norm_max": norms.max().item(), "b_enc_mean": sae.b_enc.mean().item(),
                 "b_dec_norm": sae.b_dec.norm().item(), "n_parameters": sum(p.numel() for p in sae.parameters())}
    return {"path": str(args.path), "config": config_to_dict(sae.cfg), "statistics": stats}
