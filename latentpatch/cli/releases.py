"""`latentpatch releases`: the SAEs shipped inside the package, with their held-out figures.

Each can be named wherever a command takes an SAE, as `RELEASE/SAE_ID`; `load_release(RELEASE, SAE_ID)`
loads it in Python. The figures are those the registry records, measured on the held-out split of
the real corpora when the release was made.
"""

from __future__ import annotations

import argparse
from typing import Any

from latentpatch.cli.common import fmt, table

EXAMPLE = "example: latentpatch releases\n         latentpatch patch smollm2-135m-res/blocks.15.hook_resid_pre --clean ..."
FIGURES = ("d_sae", "l0", "ce_loss_score", "kl_div_with_sae", "explained_variance", "frac_dead", "error_share")


JSON_OUTPUT = {
    "saes": "one object per shipped SAE: name (RELEASE/SAE_ID), release, sae_id, weights_sha256, corpus, heldout figures",
}
"""The top-level keys of `--json`, documented on the docs' CLI page; a test holds the output to them."""


def register(sub: Any) -> None:
    """Add `releases` to the `latentpatch` parser."""
    p = sub.add_parser("releases", help="list the shipped SAE releases and their held-out figures",
                       description=__doc__.split("\n\n")[1] + "\n\n" + EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=run_releases, json_output=JSON_OUTPUT, describe=describe_releases)


def run_releases(args: argparse.Namespace) -> dict[str, Any]:
    from sae import list_releases
    from sae.registry import release_entry

    rows = []
    for release, sae_ids in list_releases().items():
        for sae_id in sae_ids:
            entry = release_entry(release, sae_id)
            figures = {key: entry.heldout[key] for key in FIGURES if key in entry.heldout}
            rows.append({"name": f"{release}/{sae_id}", "release": release, "sae_id": sae_id,
                         "weights_sha256": entry.weights_sha256, "corpus": entry.heldout.get("corpus"),
                         "heldout": figures})
    return {"saes": rows}


def describe_releases(result: dict[str, Any]) -> str:
    """A table: one SAE a row, its held-out figures rounded."""
    if not result["saes"]:
        return "No SAE releases are shipped with this installation."
    header = ("SAE", "d_sae", "L0", "CE rec.", "KL", "EV", "dead")
    rows = [header]
    for sae in result["saes"]:
        f = sae["heldout"]
        rows.append((sae["name"], fmt(f.get("d_sae"), "d"), fmt(f.get("l0"), ".1f"),
                     fmt(f.get("ce_loss_score"), ".3f"), fmt(f.get("kl_div_with_sae"), ".3f"),
                     fmt(f.get("explained_variance"), ".3f"), fmt(f.get("frac_dead"), ".1%")))
    lines = [table(rows), "", "Figures: held-out split of the real corpora (CE rec. = CE loss recovered, KL = KL "
             "divergence of the spliced model in nats). Name an SAE as in the first column wherever a command takes one."]
    return "\n".join(lines)
