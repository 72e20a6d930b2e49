"""`latentpatch harvest`: fill activation caches for several sites in one pass over a corpus.

Each site gets its own cache folder `OUT/<hook name>/` (the layout `latentpatch train
--activation-cache` reads); the forward pass runs once per chunk of rows, to the deepest site's
layer and no further. `OUT/harvest.json` records the command, the corpus and its digest, the
tokens, the time and the rate.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from latentpatch.cli.common import bounded_int
from sae.files import atomic_write
from training.errors import TrainingConfigError

EXAMPLE = "example: latentpatch harvest --sites 5 15 25 --tokens 2000000 --text default --out runs/acts"


JSON_OUTPUT = {
    "command": "the command, to continue or repeat the harvest",
    "model": "the model", "sites": "the hook names harvested", "text": "the text harvested",
    "corpus_digest": "digest of the corpus split read, or null",
    "tokens_per_site": "activations written per site", "stopped_early": "true when interrupted (an exact cache all the same)",
    "skipped_rows": "rows skipped (--skip-rows)", "rows": "rows read", "epochs_of_text": "complete passes over the text",
    "context_size": "tokens per row", "seconds": "wall-clock time", "tokens_per_s": "harvest rate",
    "caches": "hook name -> cache folder",
}
"""The top-level keys of `--json`, documented on the docs' CLI page."""


def register(subparsers: Any) -> None:
    """Add the `harvest` subcommand to the `latentpatch` parser."""
    p = subparsers.add_parser("harvest", help="harvest activations at several sites into on-disk caches (one pass)",
                              description=__doc__.split("\n\n")[1] + "\n\n" + EXAMPLE,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="model name (default: the offline SmolLM2; gemma-3-270m "
                                                                      "is the second offline model)")
    p.add_argument("--sites", nargs="+", required=True, help="sites: layers (15), layer:kind or hook names")
    p.add_argument("--tokens", type=bounded_int(1, 2 ** 40), required=True, help="activations per site")
    p.add_argument("--text", default="default", help="a named corpus (default, real, default-no-mail, a source "
                                                     "such as brown or sotu, generated: its training split; "
                                                     "`latentpatch corpus` lists the sources), or a .txt/.jsonl file")
    p.add_argument("--out", type=Path, required=True, help="output folder; one cache per site inside it")
    # Bounded while parsing (before the model loads): --rows-per-chunk 1e14 built rows forever, 0 or a
    # negative count failed only after the model loaded. The context is checked against the model's.
    p.add_argument("--context-size", type=bounded_int(2, 1 << 20), default=128,
                   help="tokens per row, BOS included (default 128)")
    p.add_argument("--rows-per-chunk", type=bounded_int(1, 1 << 16), default=32, help="rows per forward pass (default 32)")
    p.add_argument("--skip-rows", type=bounded_int(0, 2 ** 40), default=0,
                   help="start after this many rows of the text (continue an earlier harvest into a new cache "
                        "without repeating it)")
    p.add_argument("--keep-special-tokens", action="store_true", help="keep BOS/special-token activations")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=run_harvest, json_output=JSON_OUTPUT)


def run_harvest(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from patching.model import tl_compat
    from patching.model.loading import load_model
    from training.activations.cache import write_activation_caches
    from latentpatch.cli.common import parse_site, texts_for
    from training.activations.harvest import MultiSiteChunks
    from training.data.text import TokenRows
    from training.paths import check_output_folder

    if args.tokens <= 0 or args.skip_rows < 0:
        raise TrainingConfigError(f"--tokens must be positive and --skip-rows >= 0, got {args.tokens}, "
                                  f"{args.skip_rows}")
    sites = [parse_site(text) for text in args.sites]
    if len({site.hook_name for site in sites}) < len(sites):  # refused by the harvester too, but after the model loaded
        raise TrainingConfigError(f"--sites names a site twice: {[site.hook_name for site in sites]}")
    check_output_folder(args.out)  # before the model loads: a file there failed after it, as NotADirectoryError
    if os.path.lexists(args.out / "harvest.json"):  # a second harvest replaced the first's record
        raise TrainingConfigError(f"{args.out} already holds a harvest (harvest.json); choose another --out")
    folders = {site.hook_name: args.out / site.hook_name for site in sites}
    taken = [str(f) for f in folders.values() if (f / "manifest.json").exists()]
    if taken:
        raise TrainingConfigError(f"{taken} already hold activation caches; choose another --out")
    opener, description, digest = texts_for(args.text)
    model = load_model(args.model, n_layers=max(site.layer for site in sites) + 1)
    model.eval()
    if args.context_size > tl_compat.n_ctx(model):
        raise TrainingConfigError(f"--context-size {args.context_size} is longer than the model's context "
                                  f"({tl_compat.n_ctx(model)} tokens)")
    rows = TokenRows(model, opener, context_size=args.context_size, description=description)
    if args.skip_rows:
        rows.load_state_dict({"epoch": 0, "rows_in_epoch": args.skip_rows, "rows_served": args.skip_rows})
    chunks = MultiSiteChunks(model, [site.check(model) for site in sites], rows, rows_per_chunk=args.rows_per_chunk,
                             drop_special_tokens=not args.keep_special_tokens)
    bar = tqdm(total=args.tokens, desc=f"harvesting {len(sites)} sites", unit="tok", disable=args.no_progress,
               mininterval=10, file=sys.stderr)
    stopping: list[int] = []

    def stop_after_chunk(signum: int, frame: Any) -> None:
        if stopping:  # a second Ctrl-C or SIGTERM stops at once (the caches stay unfinished)
            raise KeyboardInterrupt
        stopping.append(signum)

    # Ctrl-C or SIGTERM (a background job cannot get SIGINT) finishes the caches with the tokens in hand.
    previous = {number: signal.signal(number, stop_after_chunk) for number in (signal.SIGINT, signal.SIGTERM)}
    start = time.perf_counter()
    try:
        caches = write_activation_caches(chunks, folders, n_tokens=args.tokens, progress=bar,
                                         stop=lambda: bool(stopping))
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
    seconds = time.perf_counter() - start
    bar.close()
    tokens = json.loads((next(iter(caches.values())) / "manifest.json").read_text())["n_tokens"]
    record = {"command": _command(args, tokens), "model": args.model, "sites": list(folders), "text": args.text,
              "corpus_digest": digest, "tokens_per_site": tokens, "stopped_early": tokens < args.tokens,
              "skipped_rows": args.skip_rows, "rows": rows.rows_served, "epochs_of_text": rows.epoch,
              "context_size": args.context_size,
              "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1),
              "caches": {k: str(v) for k, v in folders.items()}}
    atomic_write(args.out / "harvest.json", json.dumps(record, indent=2).encode())
    return record


def _command(args: argparse.Namespace, tokens: int) -> str:
    """The command that reproduces these caches exactly (the tokens actually written)."""
    parts = ["latentpatch", "harvest", "--model", args.model, "--sites", *args.sites, "--tokens", str(tokens),
             "--text", args.text, "--out", str(args.out), "--context-size", str(args.context_size),
             "--rows-per-chunk", str(args.rows_per_chunk)]
    parts += ["--skip-rows", str(args.skip_rows)] if args.skip_rows else []
    return " ".join(parts + (["--keep-special-tokens"] if args.keep_special_tokens else []))
