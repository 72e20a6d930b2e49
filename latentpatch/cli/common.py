"""What the subcommands share: the SAE and prompt-pair options, loading an SAE with its model, the
output-folder check made before any work, the one-token answers, the `--site` and `--text` values."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from training.errors import TrainingConfigError


def add_sae_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("sae", type=Path, help="SAE folder (cfg.json + sae_weights.safetensors, ours or SAELens's)")
    p.add_argument("--model", default=None, help="model name (default: the one the SAE records)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def add_pair_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clean", required=True, help="prompt that shows the behaviour")
    p.add_argument("--corrupted", required=True, help="prompt that does not (same token length unless --align end)")
    p.add_argument("--answer", required=True, help="answer token of the clean prompt, with its leading space (' Paris')")
    p.add_argument("--wrong", required=True, help="answer token of the corrupted prompt (' Rome')")
    p.add_argument("--direction", choices=("denoise", "noise"), default="denoise",
                   help="denoise: corrupted run, clean values patched in; noise: the reverse (default: denoise)")
    p.add_argument("--align", choices=("end",), default=None, help="align prompts of different length on their ends")
    p.add_argument("--top", type=int, default=10, help="how many units to list (default 10)")
    p.add_argument("--out", type=Path, default=None, help="save the result (safetensors + manifest) and a PNG here")


def load_for(sae_dir: Path, model_name: str | None) -> tuple[Any, Any]:
    """The SAE and a model loaded with the weight processing the SAE records."""
    from patching.model.loading import load_model_for
    from sae import load_sae

    sae = load_sae(sae_dir)
    return sae, load_model_for(sae, model_name)


def pair_metric(args: argparse.Namespace, model: Any) -> tuple[Any, Any]:
    from patching import LogitDiff

    return LogitDiff(single_token(model, args.answer, "--answer"), single_token(model, args.wrong, "--wrong")), args.align


def single_token(model: Any, text: str, option: str) -> int:
    from patching.errors import PatchingError
    from patching.model import tl_compat

    ids = tl_compat.to_tokens(model, text, prepend_bos=False)[0]
    if ids.numel() != 1:
        raise PatchingError(f"{option} {text!r} is {ids.numel()} tokens {tl_compat.to_str_tokens(model, ids)}; expected "
                            "exactly one token (with its leading space, e.g. ' Paris')")
    return int(ids[0])


def check_out(args: argparse.Namespace) -> None:
    """Output folders are checked before anything loads: a sweep must not fail at its end."""
    from training.paths import check_output_folder

    if getattr(args, "out", None) is not None:
        check_output_folder(args.out)


def report(result: Any, args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    if args.out is not None:
        result.save(args.out)
        result.plot(args.out / "effects.png")
    top = [entry._asdict() for entry in result.top(args.top)]
    return {"method": result.method, "direction": result.direction, "units": len(result.units),
            "metric_clean": result.metric_clean.tolist(), "metric_corrupted": result.metric_corrupted.tolist(),
            "top": top, "saved_to": str(args.out) if args.out else None, **extra}


def parse_site(text: str) -> Any:
    from patching.model.sites import Site

    if text.startswith("blocks."):
        return Site.from_hook_name(text)
    layer, _, kind = text.partition(":")
    if not layer.isdigit():
        raise TrainingConfigError(f"--site {text!r}: expected a layer (15), layer:kind (15:resid_post) or a hook name")
    return Site(int(layer), kind or "resid_pre")


def texts_for(text: str) -> tuple[Any, str, str | None]:
    """(opener, description, corpus digest or None) for a `--text` value; named corpora use their
    training split."""
    from training.data.mix import CORPUS_NAMES, corpus_digest, corpus_texts
    from training.data.text import file_texts, hf_texts

    if text in CORPUS_NAMES:
        return corpus_texts(text, "train"), f"{text} corpus (train split)", corpus_digest(text, "train")
    if text.startswith("hf:"):
        return hf_texts(text[3:]), text, None
    return file_texts(text), text, None
