"""Small deterministic data sources and trainer factories shared by the training tests."""

from __future__ import annotations

import signal

from pathlib import Path
from typing import Any

import torch

from sae import SAEConfig, SparseAutoencoder
from training import ShuffleBuffer, Trainer, TrainerConfig

D_IN, D_SAE, BATCH = 8, 32, 32


class RandomChunks:
    """A ChunkSource of sparse-feature activations, chunks of varying length, own generator."""

    d_in = D_IN

    def __init__(self, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        features = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(123))
        self.features = features / features.norm(dim=-1, keepdim=True)
        self.served = 0

    def next_chunk(self) -> torch.Tensor:
        n = int(torch.randint(20, 60, (1,), generator=self.gen))
        codes = (torch.rand(n, 16, generator=self.gen) < 0.2).float() * torch.rand(n, 16, generator=self.gen)
        self.served += 1
        return codes @ self.features * 4 + 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "served": self.served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.served = int(state["served"])

    def describe(self) -> dict[str, Any]:
        return {"source": "random_chunks"}


def global_rng_batches():
    """A plain generator drawing from torch's global RNG: resumable only through saved RNGs."""
    while True:
        yield torch.randn(BATCH, D_IN) * 2 + 0.5


def shuffled_batches(seed: int = 0) -> ShuffleBuffer:
    return ShuffleBuffer(RandomChunks(seed), BATCH, capacity=4 * BATCH, seed=seed)


def fresh_saes(n: int = 2) -> list[SparseAutoencoder]:
    """SAEs whose first half of latents can never fire, so that resampling has work at step 4."""
    saes = [SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE), generator=torch.Generator().manual_seed(i))
            for i in range(n)]
    with torch.no_grad():
        for sae in saes:
            sae.b_enc[: D_SAE // 2] = -50.0
    return saes


def topk_saes(architecture: str, n: int = 2, k: int = 2) -> list[SparseAutoencoder]:
    """Fresh SAEs for the `topk` or `batchtopk` objective; k=2 of 32 leaves latents dead for AuxK."""
    kind = {"topk": "topk", "batchtopk": "jumprelu"}[architecture]
    return [SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=kind, k=k if kind == "topk" else None),
                              generator=torch.Generator().manual_seed(i)) for i in range(n)]


def topk_config(architecture: str, **overrides: Any) -> TrainerConfig:
    """`small_config` for TopK / BatchTopK: no resampling (AuxK instead), a strong AuxK term."""
    values: dict[str, Any] = dict(architecture=architecture, k=2, resample_steps=(), l1_coefficient=1.0,
                                  auxk_coefficient=0.5, batchtopk_threshold_lr=0.2)
    values.update(overrides)
    return small_config(**values)


def small_config(**overrides: Any) -> TrainerConfig:
    values: dict[str, Any] = dict(total_steps=16, lr=1e-2, l1_coefficient=(0.5, 8.0), log_every=2, init_batches=2,
                                  dead_window_tokens=2 * BATCH, resample_steps=(4, 12), checkpoint_every=4,
                                  progress_bar=False, lr_warmup_fraction=0.1, l1_warmup_fraction=0.2)
    values.update(overrides)
    return TrainerConfig(**values)


def make_trainer(out: Path | None, *, source: str = "shuffled", config: TrainerConfig | None = None) -> Trainer:
    """A trainer for `config` (default `small_config()`) on fresh SAEs of its objective."""
    batches = shuffled_batches() if source == "shuffled" else global_rng_batches()
    config = config or small_config()
    saes = fresh_saes() if config.architecture == "l1" else topk_saes(config.architecture)
    return Trainer(config, saes, batches, out_dir=out)


def same_run(a: Trainer, b: Trainer) -> bool:
    """Bit-identical parameters, optimizer moments, firing counters and log records."""
    for ma, mb in zip(a.members, b.members, strict=True):
        for (name, pa), pb in zip(ma.sae.state_dict().items(), mb.sae.state_dict().values()):
            if not torch.equal(pa, pb):
                return False
        sa, sb = ma.optimizer.state_dict()["state"], mb.optimizer.state_dict()["state"]
        if sa.keys() != sb.keys() or any(not torch.equal(sa[k][m], sb[k][m]) for k in sa for m in sa[k]):
            return False
        if not torch.equal(ma.firing.tokens_since_fired, mb.firing.tokens_since_fired):
            return False
    return torch.equal(a.generator.get_state(), b.generator.get_state()) and a.history == b.history


class SignallingBatches:
    """Batches that raise `signum` in this process as the `at`-th batch is read (Ctrl-C or a kill
    while the data is being read); `at=-1` never signals. Checkpoint state passes through."""

    def __init__(self, batches, at: int, signum: int = signal.SIGINT):
        self.batches, self.at, self.signum, self.count = batches, at, signum, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.count += 1
        if self.count == self.at:
            signal.raise_signal(self.signum)
        return next(self.batches)

    def state_dict(self):
        return self.batches.state_dict()

    def load_state_dict(self, state):
        self.batches.load_state_dict(state)

    def describe(self):
        return self.batches.describe()
