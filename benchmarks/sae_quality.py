"""Quality of the shipped SAEs against the old recipe's data, and the harvest's use of the machine.

1. (default) For each shipped SAE (`sae.registry`): its held-out figures (CE loss recovered, KL, explained
   variance, L0, dead fraction on the first rows of the real corpora's held-out split, which no
   SAE trains on), next to the same trainer run with the same recorded command on the old data,
   the generated-only corpus, at the same token budget (`--tokens` lowers both budgets together
   for a reduced run; the shipped SAE is then retrained too, so the ratio compares like with like).
   ratio = figure(real mix) / figure(generated only).
2. Harvest rate: activation tokens/s at the SAE's site (the forward pass stopped there), and the
   forward FLOP rate that implies (2 * the multiply-adds of blocks 0..layer per token, attention
   scores included), against the fp32 matmul peak measured in the same run on matmuls of the
   forward's own shapes.

3. With `--architecture l1 topk batchtopk` (issue 26 §4), instead: for the flagship site, each
   architecture's held-out figures (CE loss recovered, KL, EV with and without massive tokens, L0,
   dead fraction: `latentpatch.release.evaluate`, the registry's evaluator on its 160 rows of `--corpus`), its
   error share on the Eiffel pair (`pair_set_error_share`) and its sparse-probing accuracies on
   Brown (`training.brown_probing`); and the trainer's tokens/s for TopK and BatchTopK against L1
   on the same activation batches in the same run (`train_throughput.objective_throughput`). The
   SAEs come from `--sae ARCH=PATH`; an architecture without one is trained briefly on
   `--activations` (activation caches of the site) with `latentpatch train`.

Prints one JSON line last. Run: .venv/bin/python benchmarks/sae_quality.py [--tokens 200000]
    .venv/bin/python benchmarks/sae_quality.py --architecture l1 topk batchtopk --sae topk=RUN/topk \
        --activations OUT/acts/blocks.15.hook_resid_pre [--train-tokens 2000000]
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


ARCHITECTURES = ("l1", "topk", "batchtopk")
HEADLINE = ("ce_loss_score", "kl_div_with_sae", "explained_variance", "explained_variance_typical", "l0", "frac_dead")


def given_saes(specs: list[str], architectures: list[str]) -> dict[str, Path]:
    """`ARCH=PATH` pairs, checked before anything loads."""
    given = {}
    for spec in specs:
        arch, sep, path = spec.partition("=")
        if not sep or arch not in architectures or not Path(path).is_dir():
            raise SystemExit(f"--sae {spec!r}: expected ARCH=FOLDER with ARCH one of {architectures} and an SAE folder")
        given[arch] = Path(path)
    return given


def train_short(arch: str, args: argparse.Namespace, out: Path) -> Path:
    """A brief `latentpatch train` of one architecture on the given activation caches."""
    from latentpatch.cli.entry import main as cli

    sparsity = ["--l1", str(args.l1)] if arch == "l1" else ["--k", str(args.k)]
    argv = ["train", "--site", args.site, "--architecture", arch, *sparsity, "--d-sae", str(args.d_sae),
            "--tokens", str(args.train_tokens), "--batch-size", str(args.batch_size), "--activation-cache",
            *args.activations, "--out", str(out), "--no-progress", "--checkpoint-every", str(10**6)]
    if cli(argv) != 0:
        raise RuntimeError(f"training {arch} failed: latentpatch {' '.join(argv)}")
    return out


def probing_config(scale: str) -> Any:
    from patching.splice.probing import ProbeConfig
    from training.activations.probing import ProbingConfig

    if scale == "full":
        return ProbingConfig()
    # a quick check only: two documents a genre, the news task, a few hundred tokens
    return ProbingConfig(documents_per_genre=2, train_windows_per_document=2, test_windows_per_document=2,
                         max_train_tokens=400, max_test_tokens=200, genres=("news",),
                         probe=ProbeConfig(max_per_class=1000, min_per_class=3))


def architecture_quality(model: Any, name: str, sae: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One SAE's held-out figures, Eiffel error share and probing accuracies."""
    from latentpatch.release import evaluate
    from patching.safety import named_pairs, pair_set_error_share
    from training.activations.probing import brown_probing

    start = time.perf_counter()
    (figures,) = evaluate([Path(name)], n_rows=args.rows, corpus=args.corpus, saes=[sae], model=model)
    share = pair_set_error_share(model, sae, named_pairs(["factual"]))
    probing = brown_probing(model, sae, config=probing_config(args.probe_scale))
    return {**{k: figures[k] for k in HEADLINE}, "eiffel_error_share": {k: float(getattr(share, k)[0])
                                                                        for k in ("latents", "error", "total")},
            "probing_mean": probing.mean(),
            "probing": {task: {k: v for k, v in scores.items() if k != "top_latents"}
                        for task, scores in probing.tasks.items()},
            "seconds": round(time.perf_counter() - start, 1)}


def compare_architectures(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Part 3 of the module docstring: every named architecture at one site, and the step rates."""
    from latentpatch.cli.common import parse_site
    from patching.model.loading import load_model
    from sae import load_sae
    from train_throughput import objective_throughput
    from training.activations.cache import cached_batches

    given = given_saes(args.sae, args.architecture)
    missing = [arch for arch in args.architecture if arch not in given]
    if (missing or not args.no_throughput) and not args.activations:
        raise SystemExit(f"--activations is needed to train {missing} and to time the trainer")
    site = parse_site(args.site)
    folders = {arch: given.get(arch) or train_short(arch, args, work / arch) for arch in args.architecture}
    model = load_model(n_layers=args.n_layers)
    model.eval()
    results: dict[str, Any] = {"site": site.hook_name, "rows": args.rows, "corpus": args.corpus, "architectures": {}}
    for arch, folder in folders.items():
        sae = load_sae(folder)
        if sae.cfg.hook_name != site.hook_name:
            raise SystemExit(f"{folder} is an SAE at {sae.cfg.hook_name}, not at --site {site.hook_name}")
        results["architectures"][arch] = {"sae": str(folder), "trained_here": arch not in given, "d_sae": sae.cfg.d_sae,
                                          **architecture_quality(model, str(folder), sae, args)}
        print(json.dumps({arch: results["architectures"][arch]}), flush=True)
    if not args.no_throughput:
        stream = iter(cached_batches(args.activations, batch_size=args.batch_size))
        batches = [next(stream) for _ in range(4)]
        results["trainer_throughput"] = objective_throughput(batches, args.k, d_sae=args.d_sae)
    return results


def main(argv: list[str] | None = None) -> None:
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
    arch = parser.add_argument_group("architecture comparison (part 3)")
    arch.add_argument("--architecture", nargs="+", choices=ARCHITECTURES, default=None,
                      help="compare these architectures at --site instead of parts 1-2")
    arch.add_argument("--corpus", default="real-no-mail", help="held-out split the figures are measured on (default "
                                                               "real-no-mail: release v2's training mix)")
    arch.add_argument("--site", default="15", help="the flagship site (default 15: blocks.15.hook_resid_pre)")
    arch.add_argument("--sae", nargs="*", default=[], metavar="ARCH=FOLDER", help="trained SAEs per architecture")
    arch.add_argument("--activations", nargs="*", default=[], help="activation caches of the site: short training "
                                                                    "of the architectures without --sae, and the timing")
    arch.add_argument("--d-sae", type=int, default=4608, help="width of SAEs trained here and of the timed trainers")
    arch.add_argument("--k", type=int, default=64, help="k of TopK/BatchTopK trained or timed here (default 64)")
    arch.add_argument("--l1", type=float, default=5.0, help="L1 coefficient of an L1 SAE trained here")
    arch.add_argument("--train-tokens", type=int, default=2_000_000, help="tokens of each short training")
    arch.add_argument("--batch-size", type=int, default=4096, help="training and timing batch (default 4096)")
    arch.add_argument("--n-layers", type=int, default=None, help="cut the model to this many layers (quick checks; "
                                                                  "the figures are then of the cut model)")
    arch.add_argument("--probe-scale", choices=("full", "small"), default="full",
                      help="probing: the registry's protocol, or a few documents (a quick check)")
    arch.add_argument("--no-throughput", action="store_true", help="skip timing the trainer")
    args = parser.parse_args(argv)
    if args.architecture is not None:
        with tempfile.TemporaryDirectory() as tmp:
            result = compare_architectures(args, args.work or Path(tmp))
        print(json.dumps({"benchmark": "sae_quality_architectures", "threads": torch.get_num_threads(), **result}))
        return
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
