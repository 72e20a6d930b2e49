"""`latentpatch paths`: path patching on a prompt pair (Wang et al. 2022; Goldowsky-Dill et al. 2023).

Each sender's (every head and MLP by default, or those named) patched output reaches the metric only
through the receivers' inputs (`--receivers`: the logits, heads' q/k/v inputs, MLP inputs), every other
path frozen at the base run; all receivers at once (`--by sender`) or one receiver at a time (`--by edge`).

With `--sae` (repeatable; residual-stream SAEs) SAE latents and error nodes are senders and receivers too,
named as their labels: `L3.resid_pre/#12` (latent 12 of the SAE at blocks.3.hook_resid_pre), `L3.resid_pre/err`
(its error node), either with `@POS` for one position (`L3.resid_pre/#12@7`).
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from latentpatch.cli.common import add_pair_command, check_out, load_plain_model, pair_metric, resolve_sae, table

JSON_OUTPUT = {
    "direction": "denoise or noise",
    "senders": "how many senders were patched",
    "receivers": "the receiver groups (labels), one per column",
    "metric_clean": "the metric on each pair's clean prompt",
    "metric_corrupted": "the metric on each pair's corrupted prompt",
    "top": "the --top (sender, receivers, effect) entries by |effect|",
    "saved_to": "the result folder (--out), or null",
}
"""The top-level keys of `--json`, documented on the docs' CLI page; a test holds the output to them."""

RECEIVER_CHOICES = ("logits", "q", "k", "v", "mlp")
_NODE = re.compile(r"^(?:L(\d+)H(\d+)|MLP(\d+)|embed)$")
_LATENT = re.compile(r"^L(\d+)\.(resid_pre|resid_mid|resid_post)/(?:#(\d+)|err)(?:@(\d+))?$")


def register(sub: Any) -> None:
    """Add `paths` to the `latentpatch` parser."""
    p = add_pair_command(sub, "paths", "path patching: senders' effects through chosen receivers' inputs", sae=False,
                         description=__doc__.split("\n\n")[1])
    p.add_argument("--senders", nargs="+", default=None, metavar="NODE",
                   help="senders: L<layer>H<head>, MLP<layer>, embed, or with --sae a latent or error node "
                        "(L3.resid_pre/#12, L3.resid_pre/err, @POS for one position) (default: the embedding and every "
                        "head and MLP)")
    p.add_argument("--receivers", nargs="+", default=["logits"], metavar="KIND_OR_NODE",
                   help=f"receiver kinds ({', '.join(RECEIVER_CHOICES)}) and, with --sae, latent or error nodes at later "
                        "sites (L5.resid_pre/#3, L5.resid_pre/err) (default: logits, i.e. each sender's direct effect)")
    p.add_argument("--sae", action="append", default=None,
                   help="an SAE (folder or RELEASE/SAE_ID) on the residual stream whose latents and error node may be "
                        "named as senders and receivers; repeat for several sites (the model is loaded with the first "
                        "SAE's weight processing)")
    p.add_argument("--receiver-layers", type=int, nargs="+", default=None, help="layers of q/k/v/mlp receivers (default: all)")
    p.add_argument("--by", choices=("sender", "edge"), default="sender",
                   help="every receiver at once (default) or one receiver at a time")
    p.set_defaults(run=run_paths, json_output=JSON_OUTPUT, describe=describe_paths)


def parse_latent(text: str) -> Any:
    """`L3.resid_pre/#12`, `L3.resid_pre/err`, with `@POS`, as a `LatentNode` (the inverse of its
    label); None when `text` is no such label."""
    from patching.model.sites import Site
    from patching.paths import LatentNode

    match = _LATENT.match(text)
    if match is None:
        return None
    layer, kind, latent, pos = match.groups()
    return LatentNode(Site(int(layer), kind), None if latent is None else int(latent), None if pos is None else int(pos))


def parse_receivers(texts: list[str]) -> tuple[list[str], list[Any]]:
    """Receiver kinds and latent/error receiver nodes; refused (naming the bad one) before any model loads."""
    from patching.errors import PatchingError

    kinds, nodes = [], []
    for text in texts:
        node = parse_latent(text)
        if node is None and text not in RECEIVER_CHOICES:
            raise PatchingError(f"--receivers {text!r}: expected one of {', '.join(RECEIVER_CHOICES)} or a latent or error "
                                "node (L5.resid_pre/#3, L5.resid_pre/err)")
        (kinds if node is None else nodes).append(text if node is None else node)
    return list(dict.fromkeys(kinds)), list(dict.fromkeys(nodes))


def parse_nodes(texts: list[str]) -> list[Any]:
    """`L3H2`, `MLP4`, `embed` as `Node`s and latent labels as `LatentNode`s; refused (naming the bad
    one) before any model loads."""
    from patching.errors import PatchingError
    from patching.paths import Node

    nodes = []
    for text in texts:
        latent = parse_latent(text)
        if latent is not None:
            nodes.append(latent)
            continue
        match = _NODE.match(text)
        if match is None:
            raise PatchingError(f"--senders {text!r}: expected L<layer>H<head> (L3H2), MLP<layer> (MLP4), embed or a "
                                "latent or error node (L3.resid_pre/#12, L3.resid_pre/err)")
        layer, head, mlp = match.groups()
        nodes.append(Node("head", int(layer), int(head)) if layer is not None else
                     Node("mlp", int(mlp)) if mlp is not None else Node("embed"))
    return nodes


def run_paths(args: argparse.Namespace) -> dict[str, Any]:
    from patching.errors import PatchingError
    from patching.model.loading import DEFAULT_MODEL as DEFAULT
    from patching.model.loading import load_model_for
    from patching.paths import patch_paths, receivers_of, upstream_nodes

    if args.align is not None:
        raise PatchingError("paths needs prompts of equal token length (--align is not supported)")
    senders = list(dict.fromkeys(parse_nodes(args.senders))) if args.senders else None  # each node once
    kinds, latent_receivers = parse_receivers(args.receivers)
    check_out(args)
    saes = [resolve_sae(name) for name in args.sae or []]
    model = load_plain_model(args.model) if not saes else load_model_for(saes[0], args.model if args.model != DEFAULT else None)
    metric, _ = pair_metric(args, model)
    layers = list(dict.fromkeys(args.receiver_layers)) if args.receiver_layers else None  # each layer once
    receivers = (receivers_of(model, layers, kinds=tuple(kinds)) if kinds else []) + latent_receivers
    senders = upstream_nodes(model) if senders is None else senders  # the default --help promises (None was refused)
    result = patch_paths(model, args.clean, args.corrupted, metric, senders=senders, receivers=receivers,
                         saes=saes or None, direction=args.direction, by=args.by)
    if args.out is not None:
        result.save(args.out)
        result.plot(args.out / "paths.png")
    return {"direction": result.direction, "senders": len(result.senders),
            "receivers": [result.group_label(g) for g in range(len(result.receivers))],
            "metric_clean": result.metric_clean.tolist(), "metric_corrupted": result.metric_corrupted.tolist(),
            "top": [{"sender": s, "receivers": r, "effect": e} for s, r, e in result.top(args.top)],
            "saved_to": str(args.out) if args.out else None}


def describe_paths(result: dict[str, Any]) -> str:
    receivers = result["receivers"][0] if len(result["receivers"]) == 1 else f"{len(result['receivers'])} receiver groups"
    lines = [f"Path patching ({result['direction']}): {result['senders']} senders through {receivers}; metric "
             f"{result['metric_clean'][0]:.3f} clean, {result['metric_corrupted'][0]:.3f} corrupted. The largest effects:", ""]
    rows: list[tuple[Any, ...]] = [("sender", "through", "effect")]
    rows += [(e["sender"], e["receivers"], f"{e['effect']:+.3f}") for e in result["top"]]
    lines.append(table(rows))
    if result["saved_to"]:
        lines += ["", f"Saved to {result['saved_to']}."]
    return "\n".join(lines)


