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


class UsageError(Exception):
    """A command line argparse cannot parse; printed as one line with exit status 1, like every error."""


class _Parser(argparse.ArgumentParser):
    """argparse prints usage and exits 2; the CLI's contract is one line and exit 1."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="latentpatch", description="Causal experiments on sparse-autoencoder latents.")
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
    demo.add_argument("--safety-pairs", type=int, default=3, help="refuse/comply pairs in the safety curve (default 3)")
    demo.add_argument("--train", action="store_true", help="train the demo SAE instead of using the shipped release SAE")
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
    for command in sub.choices.values():  # `--debug` after the subcommand too; SUPPRESS keeps the top-level value
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    from latentpatch.demo import DemoConfig, run_demo as run
    from training.paths import check_output_folder

    check_output_folder(args.out)
    config = DemoConfig(out=args.out, layer=args.layer, d_sae=args.d_sae, train_tokens=args.train_tokens,
                        safety_pairs=args.safety_pairs, train=args.train)
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


def _text(result: dict[str, Any], indent: str = "") -> str:
    lines = []
    for key, value in result.items():
        if isinstance(value, dict):
            lines += [f"{indent}{key}:", _text(value, indent + "  ")]
        else:
            lines.append(f"{indent}{key}: {value:.6g}" if isinstance(value, float) else f"{indent}{key}: {value}")
    return "\n".join(line for line in lines if line)


# Libraries that log retries and download chatter at WARNING: the CLI reports their failure as one line.
QUIET_LOGGERS = ("huggingface_hub", "urllib3", "transformers", "datasets", "filelock", "httpx", "fsspec")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug, command = "--debug" in argv, "latentpatch"
    try:  # everything, imports included, so that Ctrl-C at any moment is one line
        args = build_parser().parse_args(argv)
        debug, command = args.debug, f"latentpatch {args.command}"
        _configure_logging()
        result = args.run(args)
        if result is not None:  # None: a rank other than 0 of a torchrun job (rank 0 reports)
            print(json.dumps(result) if args.json else _text(result))
    except KeyboardInterrupt as err:  # TrainingInterrupted says which checkpoint it wrote
        print(f"{command}: interrupted" + (f" ({err})" if str(err) else ""), file=sys.stderr)
        return 130
    except Exception as err:  # the CLI's one boundary: one clear line unless --debug
        if debug:
            raise
        print(str(err) if isinstance(err, UsageError) else f"{command}: {one_line(err)}", file=sys.stderr)
        return 1
    return 0


def one_line(err: BaseException) -> str:
    """`Type: message` on one line; the hub's unreachable-host errors say so in plain words."""
    message = " ".join(str(err).split())
    if _is_offline(err):
        return (f"{type(err).__name__}: the Hugging Face hub is unreachable (no network?) and the files are not in the "
                "local cache; use the offline default model (smollm2-135m-instruct) or a machine with network access")
    return f"{type(err).__name__}: {message}"


def _is_offline(err: BaseException) -> bool:
    seen: BaseException | None = err
    while seen is not None:
        name = type(seen).__name__
        hub_error = type(seen).__module__ != "builtins" and name in (
            "LocalEntryNotFoundError", "ConnectionError", "ConnectTimeout", "NameResolutionError", "MaxRetryError",
            "OfflineModeIsEnabled")
        if hub_error or "couldn't connect to 'https://huggingface.co'" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _configure_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for package in ("sae", "patching", "training", "latentpatch"):
        logging.getLogger(package).setLevel(logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
