"""Feature recovery on SAELens's synthetic activations: a known dictionary in superposition.

`sae_lens.synthetic` draws sparse feature activations (each feature fires independently with
a Zipfian-spread probability, magnitude 1 +- noise) and maps them through a fixed dictionary of
unit feature vectors, `num_features` of them in a `hidden_dim`-dimensional space. Both trainers
(ours and SAELens's `SAETrainer` through `train_toy_sae`) see the same synthetic model and the
same number of samples, with d_sae equal to the true number of features. The figure is the
mean max cosine similarity (MMCS): for each true feature, the best cosine with any decoder row,
averaged over features (1 = every feature has an exact match). Target: >= 0.9.

Prints a JSON line last. Run: .venv/bin/python benchmarks/synthetic_recovery.py [--steps 3000]
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

NUM_FEATURES, HIDDEN_DIM, BATCH = 256, 64, 1024


def synthetic_model(seed: int):
    from sae_lens.synthetic import ActivationGenerator, FeatureDictionary, zipfian_firing_probabilities

    torch.manual_seed(seed)
    features = FeatureDictionary(NUM_FEATURES, HIDDEN_DIM, seed=seed)
    probabilities = zipfian_firing_probabilities(NUM_FEATURES, exponent=0.5, max_prob=0.3, min_prob=0.01)
    generator = ActivationGenerator(NUM_FEATURES, probabilities, std_firing_magnitudes=0.1)
    return features, generator


def mmcs(decoder_rows: torch.Tensor, true_features: torch.Tensor) -> float:
    rows = decoder_rows / decoder_rows.norm(dim=-1, keepdim=True)
    truth = true_features / true_features.norm(dim=-1, keepdim=True)
    return (truth @ rows.T).max(dim=1).values.mean().item()


def train_ours(features, generator, steps: int, l1: float, lr: float, seed: int):
    from sae_lens.synthetic import SyntheticActivationIterator

    from sae import SAEConfig, SparseAutoencoder
    from training import Trainer, TrainerConfig

    cfg = TrainerConfig(total_steps=steps, lr=lr, l1_coefficient=l1, log_every=steps, checkpoint_every=None,
                        progress_bar=False, seed=seed, resample_steps=(steps // 4, steps // 2),
                        dead_window_tokens=50 * BATCH)
    sae = SparseAutoencoder(SAEConfig(d_in=HIDDEN_DIM, d_sae=NUM_FEATURES), generator=torch.Generator().manual_seed(seed))
    trainer = Trainer(cfg, sae, SyntheticActivationIterator(features, generator, BATCH))
    start = time.perf_counter()
    trainer.fit()
    return sae.W_dec.detach(), time.perf_counter() - start, trainer.history[-1]


def train_saelens(features, generator, steps: int, l1: float, lr: float, seed: int):
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.synthetic import train_toy_sae

    torch.manual_seed(seed)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=HIDDEN_DIM, d_sae=NUM_FEATURES, l1_coefficient=l1,
                                                        l1_warm_up_steps=steps // 20, dtype="float32", device="cpu"))
    start = time.perf_counter()
    train_toy_sae(sae, features, generator, training_samples=steps * BATCH, batch_size=BATCH, lr=lr)
    return sae.W_dec.detach(), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="training steps of each trainer (default 3000)")
    parser.add_argument("--l1", type=float, default=1.5, help="our L1 coefficient, in normalized units (default 1.5)")
    parser.add_argument("--saelens-l1", type=float, default=None, help="SAELens's L1 coefficient on raw inputs "
                        "(default: ours, rescaled by our normalization so both penalties weigh the same)")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate of both (default 3e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both (default 1: the matrices "
                        "are small, and extra threads only add synchronisation)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    from sae_lens.synthetic import SyntheticActivationIterator

    from training.trainer.init import normalization_scale

    features, generator = synthetic_model(args.seed)
    sample = next(SyntheticActivationIterator(features, generator, 8 * BATCH))
    scale = normalization_scale(sample)
    # Ours minimises ||x/s - x_hat/s||^2 + l1 * L1(z); SAELens, on raw x, ||x - x_hat||^2 + l1' * L1(z).
    # Multiplying ours by s^2, with z measured in raw units (z_raw = s z), gives l1' = l1 * s.
    saelens_l1 = args.saelens_l1 if args.saelens_l1 is not None else args.l1 * scale
    true = features.feature_vectors.detach()
    ours_dec, ours_s, ours_last = train_ours(features, generator, args.steps, args.l1, args.lr, args.seed)
    theirs_dec, theirs_s = train_saelens(features, generator, args.steps, saelens_l1, args.lr, args.seed)
    ours_mmcs, theirs_mmcs = mmcs(ours_dec, true), mmcs(theirs_dec, true)
    print(json.dumps({
        "benchmark": "synthetic_recovery", "num_features": NUM_FEATURES, "hidden_dim": HIDDEN_DIM,
        "d_sae": NUM_FEATURES, "steps": args.steps, "batch": BATCH, "samples": args.steps * BATCH,
        "l1": args.l1, "saelens_l1": round(saelens_l1, 4), "input_scale": round(scale, 4),
        "ours_mmcs": round(ours_mmcs, 4), "saelens_mmcs": round(theirs_mmcs, 4),
        "ours_final_l0": round(ours_last.get("l0", float("nan")), 2),
        "ours_final_ev": round(ours_last.get("explained_variance", float("nan")), 4),
        "ours_seconds": round(ours_s, 1), "saelens_seconds": round(theirs_s, 1), "threads": args.threads,
        "target_mmcs>=0.9": ours_mmcs >= 0.9,
    }))


if __name__ == "__main__":
    main()
