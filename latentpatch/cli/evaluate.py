"""`latentpatch eval`: SAEBench's core evaluation of an SAE spliced into its model, and with `--pairs`
the error share on the named prompt pairs (`patching.safety.pair_set_error_share`)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from latentpatch.cli.common import add_sae_options, load_for

PAIR_GROUPS = ("factual", "ioi", "safety")
"""`patching.safety.PAIR_GROUPS`, spelled here so that `latentpatch --help` imports no torch (a test
holds the two equal)."""

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


JSON_OUTPUT = {
    "sae": "the SAE as named on the command line",
    "site": "its hook name",
    "model_behavior_preservation": "kl_div_score, kl_div_with_sae, kl_div_with_ablation (SAELens's names)",
    "model_performance_preservation": "ce_loss_score, ce_loss_with_sae, ce_loss_without_sae, ce_loss_with_ablation",
    "reconstruction_quality": "explained_variance, explained_variance_typical, mse, mse_per_token, cossim",
    "shrinkage": "l2_norm_in, l2_norm_out, l2_ratio, relative_reconstruction_bias",
    "sparsity": "l0, l1, frac_dead, frac_dense, frac_over_1_percent, dense_threshold",
    "decoder_cosine": "statistics of the cosine between decoder rows",
    "token_stats": "n_tokens, n_loss_positions, n_texts, n_massive",
    "error_share": "with --pairs: the named pair set's error share (site, span_threshold, median per group over the "
                   "pairs whose span clears it, every pair's latents/error/total shares and span); else null",
    "saved_to": "the folder eval.json and the histograms were written to (--out), or null",
}
"""The top-level keys of `--json`, documented on the docs' CLI page."""


def register(subparsers: Any) -> None:
    """Add `eval` to the `latentpatch` parser."""
    raw = argparse.RawDescriptionHelpFormatter
    ev = subparsers.add_parser("eval", help="SAEBench core evaluation of an SAE (CE/KL scores, EV, L0, density, ...)",
                               formatter_class=raw,
                               description="Splice an SAE into its model and measure SAEBench's core figures on text "
                                           "(SAELens's definitions; see patching/splice/evaluation.py); --out also "
                                           "writes eval.json and the density and decoder-cosine histograms.\n\n"
                                           "example: latentpatch eval runs/sae-l15 --text heldout.txt --out results/eval\n"
                                           "         latentpatch eval smollm2-135m-res/blocks.15.hook_resid_pre --pairs --json")
    add_sae_options(ev)
    source = ev.add_mutually_exclusive_group()
    source.add_argument("--text", type=Path, help="a .txt file (one document per line) to evaluate on; default: built-in sentences")
    source.add_argument("--heldout-rows", type=int, default=None, metavar="N",
                        help="evaluate on the first N packed rows of the real corpus's held-out split, the rows the "
                             "release registry (N=160) and `latentpatch train --eval-every` read: the same figures")
    ev.add_argument("--pairs", nargs="*", default=None, choices=PAIR_GROUPS, metavar="GROUP",
                    help="also measure the error share on the named prompt pairs (issue 26 section 4): the latents' "
                         "and the error node's shares of each pair's exact denoising effect, with medians; groups "
                         f"{', '.join(PAIR_GROUPS)} (default: all)")
    ev.add_argument("--span-threshold", type=float, default=1.0,
                    help="with --pairs: a pair counts in the medians only if M(clean) - M(corrupted) reaches this (default 1)")
    ev.add_argument("--out", type=Path, default=None, help="write eval.json and the two histograms into this folder "
                                                             "(with --pairs, the pair set's result into the sibling folder OUT-pairs: a result "
                                                             "folder is replaced whole, so it holds no subfolder)")
    ev.add_argument("--batch-size", type=int, default=8, help="texts per forward pass (default 8)")
    ev.add_argument("--context-size", type=int, default=128, help="truncate each text to this many tokens (default 128)")
    ev.add_argument("--max-tokens", type=int, default=None, help="stop once this many tokens are evaluated (default: all)")
    ev.set_defaults(run=run_eval, json_output=JSON_OUTPUT)


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    from patching.safety import PairSetConfig, named_pairs, pair_set_error_share
    from patching.splice import EvalConfig, evaluate_sae, save_evaluation
    from patching.model.provenance import provenance
    from training.paths import check_input_file, check_output_folder
    from training.data.text import check_utf8_text

    if args.out is not None:  # before the model loads: a file there failed after 60 s of evaluation
        check_output_folder(args.out)
    if args.text:  # checked before the model loads: missing, a folder, binary
        check_utf8_text(check_input_file(args.text, option="--text"))
    if args.heldout_rows is not None and args.heldout_rows < 1:
        raise ValueError(f"--heldout-rows must be a positive int, got {args.heldout_rows}")
    config = EvalConfig(batch_size=args.batch_size, context_size=args.context_size, max_tokens=args.max_tokens)
    pair_config = PairSetConfig(span_threshold=args.span_threshold)  # a bad threshold fails before the model loads
    sae, model = load_for(args.sae, args.model)
    corpus, described = _corpus(args, model)
    result = evaluate_sae(model, sae, corpus, config=config)
    shares = None
    if args.pairs is not None:
        shares = pair_set_error_share(model, sae, named_pairs(args.pairs or PAIR_GROUPS), config=pair_config)
    if args.out is not None:
        save_evaluation(result, args.out, provenance=provenance(model, saes=sae, prompts=described, sae=str(args.sae),
                                                                config=asdict(config)))
        if shares is not None:
            shares.save(args.out.with_name(f"{args.out.name}-pairs"))
    return {"sae": str(args.sae), **result.to_dict(), "error_share": shares.registry_block() if shares else None,
            "saved_to": str(args.out) if args.out else None}


def _corpus(args: argparse.Namespace, model: Any) -> tuple[Any, str]:
    """What to evaluate on, and how the saved provenance names it."""
    if args.heldout_rows is not None:
        from training.data.heldout import heldout_tokens

        rows = heldout_tokens(model, n_rows=args.heldout_rows, context_size=args.context_size)
        return rows, f"real corpus, held-out split, first {args.heldout_rows} rows of {args.context_size} tokens"
    if args.text:
        return text_lines(args.text), str(args.text)
    return iter(EVAL_TEXTS), "built-in sentences"


def text_lines(path: Path) -> Iterator[str]:
    """The non-blank lines of `path`, read lazily (a held-out file can be large)."""
    with path.open(encoding="utf-8") as handle:
        yield from (line.rstrip("\n") for line in handle if line.strip())
