"""The `latentpatch` command: `demo` and `inspect` (further subcommands arrive with their issues).

Errors print one line and exit with status 1; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

DEMO_TEXTS = (
    "The Eiffel Tower is located in the city of Paris, which is also famous for the Louvre.",
    "When Mary and John went to the store, John gave a drink to Mary.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "The stock market fell sharply on Monday after the central bank raised interest rates.",
    "She opened the old wooden door slowly and stepped into the dark hallway.",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentpatch", description="Causal experiments on sparse-autoencoder latents.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="load the default model, splice a fresh SAE, print its splice metrics",
                          description="Load SmolLM2-135M-Instruct offline, check it (Paris, IOI), splice a freshly "
                                      "initialised SAE at a middle layer and print its splice metrics.\n\n"
                                      "example: latentpatch demo --layer 15 --d-sae 4608 --json",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--layer", type=int, default=15, help="layer of the resid_pre site (default: 15 of 30)")
    demo.add_argument("--d-sae", type=int, default=4608, help="number of latents of the fresh SAE (default: 8 x 576)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the SAE's initialisation (default: 0)")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    demo.set_defaults(run=run_demo)

    inspect = sub.add_parser("inspect", help="print an SAE folder's config and weight statistics",
                             description="Validate and describe an SAE folder (ours or SAELens's).\n\n"
                                         "example: latentpatch inspect runs/sae-l15 --json",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    inspect.add_argument("path", type=Path, help="folder holding cfg.json and sae_weights.safetensors")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    inspect.set_defaults(run=run_inspect)
    return parser


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from patching import DEFAULT_MODEL, Site, load_model, splice, splice_metrics
    from sae import SAEConfig, SparseAutoencoder

    model = load_model()
    site = Site(args.layer).check(model)
    sanity = _sanity(model)
    sae = SparseAutoencoder(
        SAEConfig(d_in=site.width(model), d_sae=args.d_sae, hook_name=site.hook_name, model_name=DEFAULT_MODEL,
                  model_from_pretrained_kwargs=model.latentpatch_origin.flags.as_kwargs()),
        generator=torch.Generator().manual_seed(args.seed),
    )
    tokens = model.to_tokens(list(DEMO_TEXTS))
    with torch.inference_mode():
        reference = model(tokens)
        with splice(model, sae):
            identical = torch.equal(model(tokens), reference)
    metrics = splice_metrics(model, sae, tokens)
    return {"model": DEFAULT_MODEL, "site": site.hook_name, "d_sae": args.d_sae, "sanity": sanity,
            "splice_identity_exact": identical, "splice_metrics": metrics.to_dict()}


def _sanity(model: Any) -> dict[str, Any]:
    import torch

    with torch.inference_mode():
        paris = model(model.to_tokens("The Eiffel Tower is located in the city of"))[0, -1]
        ioi = model(model.to_tokens("When Mary and John went to the store, John gave a drink to"))[0, -1]
    diff = ioi[model.to_single_token(" Mary")] - ioi[model.to_single_token(" John")]
    return {"eiffel_top_token": model.to_string(paris.argmax()), "ioi_logit_diff_mary_minus_john": round(diff.item(), 4)}


def run_inspect(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from sae import load_sae
    from sae.files import config_to_dict

    sae = load_sae(args.path)
    with torch.no_grad():
        norms = sae.decoder_norms()
        stats = {"decoder_norm_min": norms.min().item(), "decoder_norm_mean": norms.mean().item(),
                 "decoder_norm_max": norms.max().item(), "b_enc_mean": sae.b_enc.mean().item(),
                 "b_dec_norm": sae.b_dec.norm().item(), "n_parameters": sum(p.numel() for p in sae.parameters())}
    return {"path": str(args.path), "config": config_to_dict(sae.cfg), "statistics": stats}


def _print_text(result: dict[str, Any], indent: str = "") -> None:
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print_text(value, indent + "  ")
        else:
            print(f"{indent}{key}: {value:.6g}" if isinstance(value, float) else f"{indent}{key}: {value}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for package in ("sae", "patching", "training", "latentpatch"):
        logging.getLogger(package).setLevel(logging.INFO)
    try:
        result = args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the CLI's one boundary: one clear line unless --debug
        if args.debug:
            raise
        print(f"latentpatch {args.command}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        _print_text(result)
    return 0
