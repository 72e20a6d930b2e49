"""`latentpatch eval | patch | attribute | safety`: the experiments, one command each."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

EVAL_TEXTS = (
    "The Eiffel Tower is located in the city of Paris, which is also famous for the Louvre.",
    "When Mary and John went to the store, John gave a drink to Mary.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "The stock market fell sharply on Monday after the central bank raised interest rates.",
    "She opened the old wooden door slowly and stepped into the dark hallway.",
    "To bake bread, mix flour, water, salt and yeast, knead the dough and let it rise for an hour.",
    "The committee will meet again next Thursday to review the budget proposal.",
)


def register(subparsers: Any) -> None:
    """Add `eval`, `patch`, `attribute` and `safety` to the `latentpatch` parser."""
    raw = argparse.RawDescriptionHelpFormatter
    ev = subparsers.add_parser("eval", help="SAEBench core evaluation of an SAE (CE/KL scores, EV, L0, density, ...)",
                               formatter_class=raw,
                               description="Splice an SAE into its model and measure SAEBench's core figures on text "
                                           "(SAELens's definitions; see patching/splice/evaluation.py); --out also "
                                           "writes eval.json and the density and decoder-cosine histograms.\n\n"
                                           "example: latentpatch eval runs/sae-l15 --text heldout.txt --out results/eval")
    _common(ev)
    ev.add_argument("--text", type=Path, help="a .txt file (one document per line) to evaluate on; default: built-in sentences")
    ev.add_argument("--out", type=Path, default=None, help="write eval.json and the two histograms into this folder")
    ev.add_argument("--batch-size", type=int, default=8, help="texts per forward pass (default 8)")
    ev.add_argument("--context-size", type=int, default=128, help="truncate each text to this many tokens (default 128)")
    ev.add_argument("--max-tokens", type=int, default=None, help="stop once this many tokens are evaluated (default: all)")
    ev.set_defaults(run=run_eval)
    for name, helptext in (("patch", "exact latent patching sweep on a prompt pair"),
                           ("attribute", "attribution estimate (AtP / IG / GradDrop) on a prompt pair")):
        p = subparsers.add_parser(name, help=helptext, formatter_class=raw, description=helptext + ".\n\nexample: "
                                  f"latentpatch {name} runs/sae-l15 --clean 'The Eiffel Tower is located in the city of' "
                                  "--corrupted 'The Colosseum is located in the city of' --answer ' Paris' --wrong ' Rome' "
                                  "--out results/eiffel")
        _common(p)
        _pair_options(p)
        p.set_defaults(run=run_patch if name == "patch" else run_attribute)
    _patch_specific(subparsers.choices["patch"])
    _attribute_specific(subparsers.choices["attribute"])
    sf = subparsers.add_parser("safety", help="safety latents: refusal rates, restoration curves, dynamic patching",
                               formatter_class=raw, description="Find the SAE latents behind refusals on the built-in "
                               "suite and write report.json, prompts.json and curves.png.\n\n"
                               "example: latentpatch safety runs/sae-l15 --max-pairs 8 --out results/safety")
    _common(sf)
    sf.add_argument("--out", type=Path, required=True, help="folder for the report")
    sf.add_argument("--max-pairs", type=int, default=None, help="use at most this many refuse/comply pairs (default: all)")
    sf.add_argument("--percents", type=float, nargs="+", default=None,
                    help="percents of active units at which each restoration curve is measured")
    sf.set_defaults(run=run_safety)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("sae", type=Path, help="SAE folder (cfg.json + sae_weights.safetensors, ours or SAELens's)")
    p.add_argument("--model", default=None, help="model name (default: the one the SAE records)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _pair_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clean", required=True, help="prompt that shows the behaviour")
    p.add_argument("--corrupted", required=True, help="prompt that does not (same token length unless --align end)")
    p.add_argument("--answer", required=True, help="answer token of the clean prompt, with its leading space (' Paris')")
    p.add_argument("--wrong", required=True, help="answer token of the corrupted prompt (' Rome')")
    p.add_argument("--direction", choices=("denoise", "noise"), default="denoise",
                   help="denoise: corrupted run, clean values patched in; noise: the reverse (default: denoise)")
    p.add_argument("--align", choices=("end",), default=None, help="align prompts of different length on their ends")
    p.add_argument("--top", type=int, default=10, help="how many units to list (default 10)")
    p.add_argument("--out", type=Path, default=None, help="save the result (safetensors + manifest) and a PNG here")


def _patch_specific(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unit", choices=("latent_position", "latent", "position", "error"), default="latent_position",
                   help="what one patch changes (default: each differing latent at each position)")


def _attribute_specific(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=("atp", "ig", "atp_gd"), default="atp", help="estimator (default atp)")
    p.add_argument("--steps", type=int, default=8, help="integrated-gradients path points (default 8)")
    p.add_argument("--verify", type=int, default=0, metavar="K",
                   help="check the estimate by exact patching of its top K units and K random others")


def load_for(sae_dir: Path, model_name: str | None) -> tuple[Any, Any]:
    """The SAE and a model loaded with the weight processing the SAE records."""
    from patching.model.loading import load_model_for
    from sae import load_sae

    sae = load_sae(sae_dir)
    return sae, load_model_for(sae, model_name)


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    from patching.splice import EvalConfig, evaluate_sae, save_evaluation
    from patching.sweep import library_version
    from sae.files import weights_sha256
    from training.paths import check_input_file
    from training.text import check_utf8_text

    if args.text:  # checked before the model loads: missing, a folder, binary
        check_utf8_text(check_input_file(args.text, option="--text"))
    config = EvalConfig(batch_size=args.batch_size, context_size=args.context_size, max_tokens=args.max_tokens)
    sae, model = load_for(args.sae, args.model)
    texts = _text_lines(args.text) if args.text else iter(EVAL_TEXTS)
    result = evaluate_sae(model, sae, texts, config=config)
    if args.out is not None:
        save_evaluation(result, args.out, provenance={
            "model": model.cfg.model_name, "sae": str(args.sae), "sae_sha256": weights_sha256(sae),
            "text": str(args.text) if args.text else "built-in sentences", "config": asdict(config),
            "library_version": library_version()})
    return {"sae": str(args.sae), **result.to_dict(), "saved_to": str(args.out) if args.out else None}


def _text_lines(path: Path) -> Iterator[str]:
    """The non-blank lines of `path`, read lazily (a held-out file can be large)."""
    with path.open(encoding="utf-8") as handle:
        yield from (line.rstrip("\n") for line in handle if line.strip())


def _pair(args: argparse.Namespace, model: Any) -> tuple[Any, Any]:
    from patching import LogitDiff

    return LogitDiff(_single_token(model, args.answer, "--answer"), _single_token(model, args.wrong, "--wrong")), args.align


def _single_token(model: Any, text: str, option: str) -> int:
    from patching.errors import PatchingError
    from patching.model import tl_compat

    ids = tl_compat.to_tokens(model, text, prepend_bos=False)[0]
    if ids.numel() != 1:
        raise PatchingError(f"{option} {text!r} is {ids.numel()} tokens {tl_compat.to_str_tokens(model, ids)}; expected "
                            "exactly one token (with its leading space, e.g. ' Paris')")
    return int(ids[0])


def _check_out(args: argparse.Namespace) -> None:
    """Output folders are checked before anything loads: a sweep must not fail at its end."""
    from training.paths import check_output_folder

    if getattr(args, "out", None) is not None:
        check_output_folder(args.out)


def _report(result: Any, args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    if args.out is not None:
        result.save(args.out)
        result.plot(args.out / "effects.png")
    top = [entry._asdict() for entry in result.top(args.top)]
    return {"method": result.method, "direction": result.direction, "units": len(result.units),
            "metric_clean": result.metric_clean.tolist(), "metric_corrupted": result.metric_corrupted.tolist(),
            "top": top, "saved_to": str(args.out) if args.out else None, **extra}


def run_patch(args: argparse.Namespace) -> dict[str, Any]:
    from patching import patch_latents

    _check_out(args)
    sae, model = load_for(args.sae, args.model)
    metric, align = _pair(args, model)
    result = patch_latents(model, sae, args.clean, args.corrupted, metric, direction=args.direction, unit=args.unit,
                           align=align)
    return _report(result, args, {})


def run_attribute(args: argparse.Namespace) -> dict[str, Any]:
    from patching import attribute_latents, verify

    _check_out(args)
    sae, model = load_for(args.sae, args.model)
    metric, align = _pair(args, model)
    result = attribute_latents(model, sae, args.clean, args.corrupted, metric, method=args.method, steps=args.steps,
                               direction=args.direction, align=align)
    checked = verify(result, top_k=args.verify, random_k=args.verify).to_dict() if args.verify else None
    return _report(result, args, {"verification": checked})


def run_safety(args: argparse.Namespace) -> dict[str, Any]:
    from patching.safety.search import SafetyConfig, find_safety_latents
    from patching.safety.prompts import SafetySuite
    from sae.files import weights_sha256

    _check_out(args)
    sae, model = load_for(args.sae, args.model)
    suite = SafetySuite()
    overrides = {"percents": tuple(args.percents)} if args.percents else {}
    report = find_safety_latents(model, sae, suite, SafetyConfig(max_pairs=args.max_pairs, **overrides))
    report.save(args.out, sae_sha256=weights_sha256(sae))
    return {"saved_to": str(args.out), **report.summary()}
