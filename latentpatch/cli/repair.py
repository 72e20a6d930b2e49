"""`latentpatch repair`: self-repair — each component's direct effect against its total effect.

Each attention layer and MLP (or each head, `--components heads`) is ablated in turn (zero, the mean over
the built-in sentences, or resampled from `--corrupted`); its direct effect (its output straight to the
logits, the final norm's scale frozen) is compared with its total effect (the ablated run), and the
downstream components whose direct effects rise to compensate are named (McGrath et al. 2023, the Hydra
effect).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from latentpatch.cli.common import (COUNT_MAX, add_model_option, bounded_int, check_out, load_plain_model, single_token,
                                    table)

EXAMPLE = ("example: latentpatch repair --prompt 'When Mary and John went to the store, John gave a drink to' "
           "--answer ' Mary' --wrong ' John' --ablation mean --out results/repair")


JSON_OUTPUT = {
    "ablation": "zero, mean or resample",
    "components": "every component: component, direct, total, repair, top_compensator, top_compensation",
    "top": "the --top components by |direct effect|, as in components",
    "saved_to": "the result folder (--out), or null",
}
"""The top-level keys of `--json`, documented on the docs' CLI page; a test holds the output to them."""


def register(sub: Any) -> None:
    """Add `repair` to the `latentpatch` parser."""
    p = sub.add_parser("repair", help="self-repair: direct vs total effects of ablating components, and compensators",
                       description=__doc__.split("\n\n")[1] + "\n\n" + EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_option(p)
    p.add_argument("--prompt", required=True, help="the prompt")
    p.add_argument("--answer", required=True, help="the token the metric favours (' Mary')")
    p.add_argument("--wrong", required=True, help="the token it is compared with (' John'): metric = logit difference")
    p.add_argument("--ablation", choices=("zero", "mean", "resample"), default="zero", help="how a component is ablated")
    p.add_argument("--corrupted", default=None, help="prompt whose outputs a resample ablation uses (same token length)")
    p.add_argument("--components", choices=("layers", "heads"), default="layers",
                   help="every attention layer and MLP (default), or every head")
    p.add_argument("--top", type=bounded_int(1, COUNT_MAX), default=10, help="how many components to list (default 10)")
    p.add_argument("--out", type=Path, default=None, help="save the result and its plot (repair.png) here")
    p.set_defaults(run=run_repair, json_output=JSON_OUTPUT, describe=describe_repair)


def run_repair(args: argparse.Namespace) -> dict[str, Any]:
    from patching.errors import PatchingError
    from patching.model import tl_compat
    from patching.sweep import LogitDiff
    from patching.tracing import Component, self_repair

    if (args.ablation == "resample") != (args.corrupted is not None):
        raise PatchingError("--corrupted is needed for --ablation resample, and only then")
    if args.top < 1:
        raise PatchingError(f"--top must be positive, got {args.top}")
    check_out(args)
    model = load_plain_model(args.model)
    metric = LogitDiff(single_token(model, args.answer, "--answer"), single_token(model, args.wrong, "--wrong"))
    components = None
    if args.components == "heads":
        components = [Component(layer, "head", head) for layer in range(tl_compat.n_layers(model))
                      for head in range(tl_compat.n_heads(model))]
    tokens = tl_compat.to_tokens(model, args.prompt)
    corrupted = tl_compat.to_tokens(model, args.corrupted) if args.corrupted is not None else None
    corpus = _mean_corpus(model) if args.ablation == "mean" else None
    result = self_repair(model, tokens, metric, components=components, ablation=args.ablation, corrupted=corrupted,
                         corpus=corpus)
    if args.out is not None:
        result.save(args.out)
        result.plot(args.out / "repair.png")
    return repair_summary(result, args.top, args.out)


def _mean_corpus(model: Any) -> Any:
    """The built-in sentences cut to the shortest one's length: a mean over real positions, no padding."""
    import torch

    from latentpatch.cli.evaluate import EVAL_TEXTS
    from patching.model import tl_compat

    rows = [tl_compat.to_tokens(model, text)[0] for text in EVAL_TEXTS]
    length = min(row.shape[0] for row in rows)
    return torch.stack([row[:length] for row in rows])


def repair_summary(result: Any, top: int, out: Path | None) -> dict[str, Any]:
    """Every component's effects, and the `top` by direct effect with their top compensator."""
    rows = []
    for i, component in enumerate(result.components):
        j = int(result.compensation[i].argmax())
        top_compensation = float(result.compensation[i, j])
        rows.append({"component": component.label(), "direct": float(result.direct[i]), "total": float(result.total[i]),
                     "repair": float(result.repair[i]),
                     "top_compensator": result.components[j].label() if top_compensation > 0 else None,
                     "top_compensation": max(top_compensation, 0.0)})
    ranked = sorted(rows, key=lambda row: abs(row["direct"]), reverse=True)[:top]
    return {"ablation": result.ablation, "components": rows, "top": ranked, "saved_to": str(out) if out else None}


def describe_repair(result: dict[str, Any]) -> str:
    lines = [f"{result['ablation'].capitalize()} ablation of {len(result['components'])} components; the "
             f"{len(result['top'])} with the largest direct effects on the logit difference (repair = direct - total: "
             "what the rest of the network restored):", ""]
    rows: list[tuple[Any, ...]] = [("component", "direct", "total", "repair", "top compensator")]
    rows += [(r["component"], f"{r['direct']:+.3f}", f"{r['total']:+.3f}", f"{r['repair']:+.3f}",
              f"{r['top_compensator']} ({r['top_compensation']:+.3f})" if r["top_compensator"] else "-")
             for r in result["top"]]
    lines.append(table(rows))
    if result["saved_to"]:
        lines += ["", f"Result and plot saved to {result['saved_to']}."]
    return "\n".join(lines)
