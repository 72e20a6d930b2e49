"""The registry's quality blocks for a shipped SAE (issue 26 §4), beside its held-out core figures:

- `error_share`: the named pair set's error share (`patching.safety.pair_set_error_share`): per pair
  the latents' and the error node's shares of the exact denoising effect, medians per group;
- `probing`: sparse probing on Brown's POS tags and genres (`training.brown_probing`): held-out
  accuracy of k-sparse latent probes against the residual probe;
- `generalisation`: the one evaluator's core figures (`evaluate_sae`) on the held-out rows of the
  training mix (`real-no-mail`, release v2's mix) next to the same figures on a source the mix
  lacks (`mail`, the withheld register), and their differences.

    python -m latentpatch.quality --release smollm2-135m-res --sae-id blocks.15.hook_resid_pre [--blocks ...]

computes the blocks on the shipped (float16) weights and writes them into the entry's `heldout`
record, read-modify-write of the registry file as `latentpatch.release` does.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from sae.files import atomic_write
from sae.registry import REGISTRY_FILE, RELEASES_DIR, load_release

log = logging.getLogger(__name__)

QUALITY_BLOCKS = ("error_share", "probing", "generalisation")
"""The blocks `quality_blocks` computes, by the key each has in a registry entry's `heldout`."""
GENERALISATION_FIGURES = ("ce_loss_score", "kl_div_score", "kl_div_with_sae", "explained_variance",
                          "explained_variance_typical", "l0", "frac_dead", "n_tokens")
"""The core figures the generalisation block sets side by side."""
IN_MIX, WITHHELD = "real-no-mail", "mail"
"""Release v2 trains on `real-no-mail`; the mails are the register it never saw."""


def generalisation_block(model: Any, sae: Any, *, n_rows: int | None = None, in_mix: str = IN_MIX,
                         withheld: str = WITHHELD) -> dict[str, Any]:
    """The core figures on the first `n_rows` held-out rows of the training mix and of the withheld
    source, each through the one evaluator, and withheld minus in-mix for each figure."""
    from latentpatch.release import EVAL_ROWS
    from patching.splice.evaluation import EvalConfig, evaluate_sae
    from training.data.heldout import heldout_tokens

    rows = EVAL_ROWS if n_rows is None else n_rows
    block: dict[str, Any] = {"n_rows": rows}
    for key, corpus in (("in_mix", in_mix), ("withheld", withheld)):
        figures = evaluate_sae(model, sae, heldout_tokens(model, corpus=corpus, n_rows=rows),
                               config=EvalConfig(progress=False)).figures()
        block[key] = {"corpus": f"{corpus} (held-out split)", **{name: figures[name] for name in GENERALISATION_FIGURES}}
    block["withheld_minus_in_mix"] = {name: block["withheld"][name] - block["in_mix"][name]
                                      for name in GENERALISATION_FIGURES if name != "n_tokens"}
    return block


def quality_blocks(model: Any, sae: Any, blocks: tuple[str, ...] = QUALITY_BLOCKS, *,
                   n_rows: int | None = None) -> dict[str, Any]:
    """The named blocks for `sae` on `model` (module docstring), each with the seconds it took."""
    from patching.safety import pair_set_error_share
    from training.activations.probing import brown_probing

    unknown = sorted(set(blocks) - set(QUALITY_BLOCKS))
    if unknown or not blocks:
        raise ValueError(f"blocks must be a non-empty subset of {QUALITY_BLOCKS}, got {list(blocks)}")
    compute = {"error_share": lambda: pair_set_error_share(model, sae).registry_block(),
               "probing": lambda: brown_probing(model, sae).registry_block(),
               "generalisation": lambda: generalisation_block(model, sae, n_rows=n_rows)}
    out = {}
    for name in blocks:
        start = time.perf_counter()
        out[name] = {**compute[name](), "seconds": round(time.perf_counter() - start, 1)}
        log.info("%s: %s", name, json.dumps(out[name])[:400])
    return out


def record_quality(release: str, sae_id: str, blocks: tuple[str, ...] = QUALITY_BLOCKS, *, root: Path = RELEASES_DIR,
                   n_rows: int | None = None, model: Any = None) -> dict[str, Any]:
    """Compute the blocks on the shipped weights of `release/sae_id` (as users load them) and write
    them into its registry entry's `heldout`; the registry is re-read just before the write."""
    from patching.model.loading import load_model_for

    shipped = load_release(release, sae_id, root=root)
    model = load_model_for(shipped) if model is None else model
    model.eval()
    computed = quality_blocks(model, shipped, blocks, n_rows=n_rows)
    registry_path = root / REGISTRY_FILE
    registry = json.loads(registry_path.read_text())
    entry = registry[release]["saes"][sae_id]
    entry["heldout"] = {**entry.get("heldout", {}), **computed}
    atomic_write(registry_path, (json.dumps(registry, indent=2, sort_keys=True) + "\n").encode())
    return entry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m latentpatch.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", required=True)
    parser.add_argument("--sae-id", required=True)
    parser.add_argument("--blocks", dest="which", nargs="+", choices=QUALITY_BLOCKS, default=list(QUALITY_BLOCKS))
    parser.add_argument("--rows", type=int, default=None, help="held-out rows per corpus for generalisation "
                                                              "(default: the registry's 160)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    entry = record_quality(args.release, args.sae_id, tuple(args.which), n_rows=args.rows)
    log.info("recorded %s", json.dumps({k: entry["heldout"][k] for k in args.which})[:2000])


if __name__ == "__main__":
    main()
