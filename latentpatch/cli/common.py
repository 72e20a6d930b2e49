"""What the subcommands share: the SAE and prompt-pair options, loading an SAE with its model, the
output-folder check made before any work, the one-token answers, the `--site` and `--text` values."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from training.errors import TrainingConfigError


SEED_MAX = 2 ** 63 - 1
"""Largest seed `torch.Generator.manual_seed` takes: a larger one failed after the model loaded."""
COUNT_MAX = 100_000
"""Largest count of units listed or pages written: beyond what a person reads or a disk wants."""
MAX_IG_STEPS = 1024
"""Most integrated-gradients path points, as `patching.attribution.estimators.MAX_IG_STEPS` (1e8 asked for 10 TB)."""


def bounded_int(low: int, high: int):
    """An argparse `type`: an int in [low, high]. Checked while parsing, so before any model loads,
    and reported as one line naming the option (`argument --top: must be in [1, 100000], got -5`):
    `--top-latents=-3` meant "all but 3" and wrote 2,301 pages before it was stopped."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value

    parse.__name__ = "int"
    return parse


class UsageError(Exception):
    """A command line argparse cannot parse, or options that contradict each other; printed as one line
    with exit status 1, like every error."""


SAE_HELP = ("the SAE: a folder (cfg.json + sae_weights.safetensors, ours or SAELens's), a shipped release id "
            "(smollm2-135m-res/blocks.15.hook_resid_pre; `latentpatch releases` lists them) or, with SAELens installed "
            "and the hub reachable, sae_lens:RELEASE/SAE_ID")


SWEEP_JSON_OUTPUT = {
    "method": "how the effects were computed (exact, atp, ig, atp_gd)",
    "direction": "denoise or noise",
    "units": "how many units were patched",
    "metric_clean": "the metric on each pair's clean prompt",
    "metric_corrupted": "the metric on each pair's corrupted prompt",
    "top": "the --top units by |effect|: site, kind, position, token, latent, effect, label",
    "saved_to": "the result folder (--out), or null",
}
"""What `report` returns: the `--json` keys of every command that prints a sweep (patch, attribute, residual,
heads), before each adds its own."""


EIFFEL_PAIR = ("--clean 'The Eiffel Tower is located in the city of' --corrupted 'The Colosseum is located in the city of' "
               "--answer ' Paris' --wrong ' Rome'")
"""The example pair the commands' help shows."""


def add_pair_command(sub: Any, name: str, helptext: str, *, sae: bool, description: str | None = None) -> Any:
    """A subcommand on a prompt pair: its parser, with an example in its help, the SAE's options (or the
    model's, for commands that take no SAE) and the pair's options."""
    example = f"example: latentpatch {name}{' runs/sae-l15' if sae else ''} {EIFFEL_PAIR} --out results/{name}"
    p = sub.add_parser(name, help=helptext, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=f"{description or helptext + '.'}\n\n{example}")
    (add_sae_options if sae else add_model_option)(p)
    add_pair_options(p)
    return p


def add_sae_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("sae", help=SAE_HELP)
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
    p.add_argument("--top", type=bounded_int(1, COUNT_MAX), default=10, help="how many units to list (default 10)")
    p.add_argument("--out", type=Path, default=None, help="save the result (safetensors + manifest) and a PNG here")


def resolve_sae(name: str | Path) -> Any:
    """The SAE `name` names, loaded before any model: a folder; a shipped release id `RELEASE/SAE_ID`
    (its weights verified against the registry); or `sae_lens:RELEASE/SAE_ID` through SAELens's
    `SAE.from_pretrained` (needs SAELens and the hub). A name that is neither an existing folder nor a
    known release lists the shipped releases (as `load_release` does for an unknown id)."""
    from sae import as_sae, list_releases, load_release, load_sae
    from sae.registry import UnknownReleaseError

    text = str(name)
    if text.startswith("sae_lens:"):
        return as_sae(_saelens_sae(text[len("sae_lens:"):]))
    release, _, sae_id = text.partition("/")
    releases = list_releases()
    if release in releases and not Path(text).exists():
        return load_release(release, sae_id)  # an unknown sae_id lists the release's ids
    path = Path(text)
    if not path.exists() and not path.is_absolute() and sae_id and not Path(release).exists():
        raise UnknownReleaseError(f"{text!r} (neither an SAE folder nor a shipped release id)",
                                  [f"{r}/{i}" for r, ids in releases.items() for i in ids])
    return load_sae(path)


def _saelens_sae(spec: str) -> Any:
    from patching.errors import PatchingError

    release, _, sae_id = spec.partition("/")
    if not release or not sae_id:
        raise PatchingError(f"sae_lens:{spec}: expected sae_lens:RELEASE/SAE_ID (e.g. "
                            "sae_lens:gpt2-small-res-jb/blocks.8.hook_resid_pre)")
    try:
        from sae_lens import SAE
    except ImportError as err:
        raise PatchingError("sae_lens: names need SAELens installed (pip install 'latentpatch[saelens]')") from err
    loaded = SAE.from_pretrained(release, sae_id)
    return loaded[0] if isinstance(loaded, tuple) else loaded  # SAELens 5 returned (sae, cfg, sparsity)


def load_for(sae_name: str | Path, model_name: str | None) -> tuple[Any, Any]:
    """The SAE (resolved before any model loads) and a model loaded with the weight processing it records."""
    from patching.model.loading import load_model_for

    sae = resolve_sae(sae_name)
    return sae, load_model_for(sae, model_name)


def add_model_option(p: argparse.ArgumentParser) -> None:
    """`--model` for the commands that take no SAE."""
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="model name (default: the offline SmolLM2-135M-Instruct; gemma-3-270m is the second offline model)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def load_plain_model(name: str) -> Any:
    """A model for the commands that take no SAE, with the default weight processing."""
    from patching.model.loading import load_model

    model = load_model(name)
    model.eval()
    return model


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


def fmt(value: Any, spec: str) -> str:
    """`value` formatted by `spec`, or `-` where there is none."""
    return "-" if value is None else format(value, spec)


def table(rows: list[tuple[Any, ...]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned, two spaces apart."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(cell).ljust(w) if i == 0 else str(cell).rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))) for row in rows)


def describe_top(result: dict[str, Any], what: str) -> str:
    """The human form of a sweep's JSON: a sentence on the pair, then its top units as a table."""
    clean, corrupted = result["metric_clean"][0], result["metric_corrupted"][0]
    lines = [f"{what}: {result['units']} units, {result['direction']}; metric {clean:.3f} on the clean prompt, "
             f"{corrupted:.3f} on the corrupted one. Effect 1 = the unit alone restores the clean metric"
             + (" (noise: destroys it)." if result["direction"] == "noise" else "."), ""]
    rows: list[tuple[Any, ...]] = [("unit", "position", "token", "effect")]
    rows += [(e["label"], fmt(e["position"], "d"), repr(e["token"]) if e["token"] is not None else "-",
              format(e["effect"], "+.3f")) for e in result["top"]]
    lines.append(table(rows))
    if result.get("saved_to"):
        lines += ["", f"Saved to {result['saved_to']}."]
    return "\n".join(lines)
