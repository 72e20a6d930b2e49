"""The `latentpatch` command: demo, train, eval, patch, attribute, steer, safety, inspect, dashboards.

Errors print one line and exit with status 1; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentpatch", description="Causal experiments on sparse-autoencoder latents.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job end to end on the default model, into an HTML report",
                          description="Train (or reuse) an SAE at a middle layer of SmolLM2-135M-Instruct on the default "
                                      "corpus, print its splice metrics, run a denoising sweep, attribution checked "
                                      "against exact patching, Top-1 vs Top-K steering and a safety restoration curve, "
                                      "and write index.html, its plots and results.json to --out.\n\n"
                                      "example: latentpatch demo --out latentpatch-output",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--out", type=Path, default=Path("latentpatch-output"), help="report folder (default: latentpatch-output)")
    demo.add_argument("--layer", type=int, default=15, help="resid_pre layer of the SAE (default: 15 of 30)")
    demo.add_argument("--d-sae", type=int, default=4608, help="dictionary size (default: 8 x 576)")
    demo.add_argument("--train-tokens", type=int, default=600_000, help="activations the SAE trains on (default 600000)")
    demo.add_argument("--safety-pairs", type=int, default=6, help="refuse/comply pairs in the safety curve (default 6)")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    demo.set_defaults(run=run_demo)

    inspect = sub.add_parser("inspect", help="print an SAE folder's config and weight statistics",
                             description="Validate and describe an SAE folder (ours or SAELens's).\n\n"
                                         "example: latentpatch inspect runs/sae-l15 --json",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    inspect.add_argument("path", type=Path, help="folder holding cfg.json and sae_weights.safetensors")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    inspect.set_defaults(run=run_inspect)
    from latentpatch.cli_experiments import register as register_experiments
    from latentpatch.cli_inspect import register_dashboards
    from latentpatch.cli_steer import register as register_steer
    from training.cli import register as register_train

    for register in (register_train, register_experiments, register_steer, register_dashboards):
        register(sub)
    return parser


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    from latentpatch.demo import DemoConfig
    from latentpatch.demo import run_demo as run

    config = DemoConfig(out=args.out, layer=args.layer, d_sae=args.d_sae, train_tokens=args.train_tokens,
                        safety_pairs=args.safety_pairs)
    results = run(config)
    brief = {key: results[key] for key in ("splice_metrics", "attribution", "seconds", "section_seconds", "report") if key in results}
    brief["sweep"] = {k: v for k, v in results.get("sweep", {}).items() if k != "top"}
    brief["safety"] = {k: results.get("safety", {}).get(k) for k in ("refusal_rates", "n_pairs", "dynamic")}
    return brief


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
    if result is None:  # a rank other than 0 of a torchrun job: rank 0 reports
        return 0
    if args.json:
        print(json.dumps(result))
    else:
        _print_text(result)
    return 0
