"""Quality of the shipped SAEs against the old recipe's data, and the harvest's use of the machine.

1. For each shipped SAE (`sae.registry`): its held-out figures (CE loss recovered, KL, explained
   variance, L0, dead fraction on the first rows of the real corpora's held-out split, which no
   SAE trains on), next to the same trainer run with the same recorded command on the old data,
   the generated-only corpus, at the same token budget (`--tokens` lowers both budgets together
   for a reduced run; the shipped SAE is then retrained too, so the ratio compares like with like).
   ratio = figure(real mix) / figure(generated only).
2. Harvest rate: activation tokens/s at the SAE's site (the forward pass stopped there), and the
   forward FLOP rate that implies (2 * the multiply-adds of blocks 0..layer per token, attention
   scores included), against the fp32 matmul peak measured in the same run on matmuls of the
   forward's own shapes.

Prints one JSON line last. Run: .venv/bin/python benchmarks/sae_quality.py [--tokens 200000]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from latentpatch.release import EVAL_ROWS


def forward_flops_per_token(model: Any, layer: int, context: int) -> float:
    """2 x multiply-adds per token of blocks 0..layer (projections, MLP, attention scores)."""
    cfg = model.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    proj = cfg.d_model * cfg.d_head * (2 * cfg.n_heads + 2 * n_kv)  # W_Q, W_O, W_K, W_V
    mlp = (3 if cfg.gated_mlp else 2) * cfg.d_model * cfg.d_mlp
    scores = 2 * (context / 2) * cfg.d_head * cfg.n_heads  # QK^T and pattern @ V, mean context length
    return 2.0 * (layer + 1) * (proj + mlp + scores)


def matmul_peak(d_model: int, d_mlp: int, rows: int = 4096, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of (rows x d_model) @ (d_model x d_mlp), the forward's largest shape."""
    a, b = torch.randn(rows, d_model), torch.randn(d_model, d_mlp)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * rows * d_model * d_mlp / (time.perf_counter() - start))
    return best


def harvest_rate(model: Any, hook_name: str, n_tokens: int) -> dict[str, float]:
    from patching import Site
    from training.activations.harvest import HarvestChunks
    from training.data.mix import corpus_texts
    from training.data.text import TokenRows

    site = Site.from_hook_name(hook_name)
    rows = TokenRows(model, corpus_texts("real", "train"), context_size=128, description="real")
    chunks = HarvestChunks(model, site, rows, rows_per_chunk=32)
    chunks.next_chunk()  # warm-up
    peak = matmul_peak(model.cfg.d_model, model.cfg.d_mlp)
    start, done = time.perf_counter(), 0
    while done < n_tokens:
        done += chunks.next_chunk().shape[0]
    seconds = time.perf_counter() - start
    peak = max(peak, matmul_peak(model.cfg.d_model, model.cfg.d_mlp))
    tokens_per_s = done / seconds  # activations kept (BOS dropped); the pass also ran the BOS positions
    positions_per_s = rows.context_size / (rows.context_size - 1) * tokens_per_s
    flop_rate = positions_per_s * forward_flops_per_token(model, site.layer, rows.context_size)
    return {"harvest_tokens_per_s": round(tokens_per_s, 1), "forward_gflop_per_s": round(flop_rate / 1e9, 2),
            "matmul_peak_gflop_per_s": round(peak / 1e9, 2), "fraction_of_peak": round(flop_rate / peak, 3),
            "harvest_seconds": round(seconds, 1)}


def _retarget(command: str, *, caches: list[str], tokens: int, out: Path, l1: float | None) -> list[str]:
    """The recorded train command on other caches, budget and output folder (one L1 when given)."""
    argv, result, skip = shlex.split(command)[1:], [], False
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            skip = arg in ("--activation-cache", "--out", "--tokens", "--l1")
            if not skip:
                result.append(arg)
        elif not skip:
            result.append(arg)
    extra = ["--l1", str(l1)] if l1 is not None else []
    return result + ["--activation-cache", *caches, "--tokens", str(tokens), "--out", str(out), "--no-progress", *extra]


def baseline_and_shipped(entry: Any, tokens: int | None, work: Path, rows: int) -> dict[str, Any]:
    from latentpatch.cli.entry import main
    from sae import load_sae
    from sae.registry import load_release
    from latentpatch.release import evaluate

    recipe = entry.recipe
    budget = tokens or recipe["train_tokens"]
    gen = work / "generated"
    if main(["harvest", "--sites", entry.sae_id, "--tokens", str(recipe["generated_harvest_tokens"]), "--text",
             "generated", "--out", str(gen), "--no-progress"]) != 0:
        raise RuntimeError("harvesting the generated corpus failed")
    runs = {"generated_only": [str(gen / entry.sae_id)]}
    if tokens is not None:  # a reduced run retrains the real-mix SAE at the same reduced budget
        # The registry names the recipe's caches under $OUT (the folder its harvests wrote to): set OUT to it.
        runs["real_mix"] = [os.path.expandvars(cache) for cache in recipe["train_caches"]]
    figures, seconds = {}, {}
    for name, caches in runs.items():
        start = time.perf_counter()
        if main(_retarget(recipe["train_command"], caches=caches, tokens=budget, out=work / name,
                          l1=recipe["l1_coefficient"])) != 0:
            raise RuntimeError(f"training {name} failed")
        seconds[name] = round(time.perf_counter() - start, 1)
        (figures[name],) = evaluate([work / name], n_rows=rows, saes=[load_sae(work / name)])
    if "real_mix" not in figures:
        (figures["real_mix"],) = evaluate([entry.folder], n_rows=rows, saes=[load_release(entry.release, entry.sae_id)])
    keys = ("ce_loss_score", "kl_div_with_sae", "explained_variance", "explained_variance_typical", "l0", "frac_dead")
    ratio = {k: round(figures["real_mix"][k] / figures["generated_only"][k], 3)
             if figures["generated_only"][k] else None for k in keys}
    return {"train_tokens": budget, "real_mix": {k: figures["real_mix"][k] for k in keys},
            "generated_only": {k: figures["generated_only"][k] for k in keys}, "ratio_real_over_generated": ratio,
            "train_seconds": seconds}


def main() -> None:
    from patching import Site
    from patching.model.loading import load_model
    from sae.registry import list_releases, release_entry

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=None, help="training tokens for both (default: the recorded)")
    parser.add_argument("--rows", type=int, default=EVAL_ROWS, help=f"held-out rows of 128 tokens per evaluation "
                                                                     f"(default {EVAL_ROWS}, the registry's)")
    parser.add_argument("--sae-id", nargs="*", default=None, help="only these shipped SAE ids (default: every one)")
    parser.add_argument("--harvest-tokens", type=int, default=16384, help="tokens for the harvest-rate measurement")
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--rate-only", action="store_true", help="measure the harvest rate only (no training)")
    args = parser.parse_args()
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "saes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for release, ids in list_releases().items():
            for sae_id in ids:
                if args.sae_id is not None and sae_id not in args.sae_id:
                    continue
                entry = release_entry(release, sae_id)
                model = load_model(n_layers=Site.from_hook_name(sae_id).layer + 1)
                rate = harvest_rate(model, sae_id, args.harvest_tokens)
                del model
                quality = {} if args.rate_only else baseline_and_shipped(entry, args.tokens, work / release / sae_id,
                                                                          args.rows)
                results["saes"][f"{release}/{sae_id}"] = {**quality, **rate}
                print(json.dumps({f"{release}/{sae_id}": results["saes"][f"{release}/{sae_id}"]}), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
