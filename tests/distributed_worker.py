"""One rank of the distributed tests' jobs (started by tests/test_training_distributed.py).

    python tests/distributed_worker.py SCENARIO OUT [--resume] [--slow]

with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set as torchrun sets them. Scenarios:
- `dp`: data-parallel training of 2 SAEs (global batch 32, 16 rows per rank), resampling twice;
- `dp-topk` / `dp-batchtopk`: the same for the TopK / BatchTopK objectives with AuxK (BatchTopK
  selects over the global batch);
- `saes`: SAE-parallel training of a 4-SAE L1 sweep, then a per-rank activation cache written
  and read back (each rank lists the shards it read in OUT/cache-read-RANK.json), then two short
  data-parallel runs in which only rank 1 meets Ctrl-C or a non-finite batch (each rank records
  how its run ended in OUT/faults-RANK.json).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from tests.test_training_helpers import RandomChunks, fresh_saes, shuffled_batches, small_config, topk_config, topk_saes
from training import NonFiniteError, Trainer, TrainerConfig, TrainingInterrupted
from training.trainer import checkpoint as ckpt
from training.activations.cache import CachedChunks, write_activation_cache
from training.trainer.data_parallel import DataParallelTrainer
from training.parallel.distributed import assigned, init_distributed, shutdown_distributed
from training.activations.sources import RowStripe

TIMEOUT_S = 30.0
SWEEP_L1 = (0.5, 8.0, 2.0, 4.0)


def dp_config() -> TrainerConfig:
    return small_config(total_steps=24, checkpoint_every=2, resample_steps=(4, 14))


def sweep_config(indices: list[int]) -> TrainerConfig:
    return small_config(l1_coefficient=tuple(SWEEP_L1[i] for i in indices), checkpoint_every=8)


def sweep_saes(indices: list[int]):
    every = fresh_saes(len(SWEEP_L1))
    return [every[i] for i in indices]


class Slow:
    """A source slow enough that a kill lands mid-run."""

    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(0.05)
        return next(self.inner)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)

    def describe(self):
        return self.inner.describe()


def run_dp(comm, out: Path, resume: bool, slow: bool) -> None:
    batches = RowStripe(shuffled_batches(), comm.rank, comm.world_size)
    trainer = DataParallelTrainer(dp_config(), fresh_saes(), Slow(batches) if slow else batches, collective=comm,
                                  out_dir=out)
    if resume:
        trainer.resume()
    (out / f"pid-{comm.rank}").write_text(str(os.getpid()))
    print("READY", trainer.step, flush=True)
    trainer.fit()
    (out / f"comm-{comm.rank}.json").write_text(json.dumps({"comm_seconds": comm.comm_seconds,
                                                            "comm_calls": comm.comm_calls}))


def run_dp_topk(comm, out: Path, architecture: str) -> None:
    batches = RowStripe(shuffled_batches(), comm.rank, comm.world_size)
    DataParallelTrainer(topk_config(architecture), topk_saes(architecture), batches, collective=comm, out_dir=out).fit()


def run_saes(comm, out: Path) -> None:
    mine = assigned(len(SWEEP_L1), comm.rank, comm.world_size)
    # Each rank trains its SAEs on its own harvest (here: the same seeded source), no traffic.
    Trainer(sweep_config(mine), sweep_saes(mine), shuffled_batches(), out_dir=out / f"rank-{comm.rank}").fit()
    cache = out / "cache"
    write_activation_cache(RandomChunks(seed=10 + comm.rank), cache, n_tokens=400, shard_tokens=64, collective=comm)
    chunks = CachedChunks(cache, rank=comm.rank, world_size=comm.world_size)
    read = [chunks._entries[int(i)][1]["file"] for i in chunks._order]
    rows = sum(chunks.next_chunk().shape[0] for _ in read)
    (out / f"cache-read-{comm.rank}.json").write_text(json.dumps({"files": sorted(read), "rows": rows}))


class Faulty:
    """Rank 1 only: Ctrl-C while reading the batch of step `at`, or a NaN in it."""

    def __init__(self, inner, rank: int, fault: str, at: int):
        self.inner, self.rank, self.fault, self.at, self.count = inner, rank, fault, at, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.count += 1
        batch = next(self.inner)
        if self.rank == 1 and self.count == self.at + small_config().init_batches:
            if self.fault == "sigint":
                signal.raise_signal(signal.SIGINT)
            else:
                batch = batch.clone()
                batch[0, 0] = float("nan")
        return batch

    def describe(self):
        return self.inner.describe()


def run_faults(comm, out: Path) -> None:
    ended = {}
    for fault in ("sigint", "nan"):
        batches = Faulty(RowStripe(shuffled_batches(), comm.rank, comm.world_size), comm.rank, fault, at=5)
        trainer = DataParallelTrainer(small_config(checkpoint_every=None), fresh_saes(), batches, collective=comm,
                                      out_dir=out / f"fault-{fault}")
        try:
            trainer.fit()
            ended[fault] = {"error": None}
        except (TrainingInterrupted, NonFiniteError) as err:
            ended[fault] = {"error": type(err).__name__, "step": err.step, "message": str(err)}
    (out / f"faults-{comm.rank}.json").write_text(json.dumps(ended))


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    comm = init_distributed(timeout_s=TIMEOUT_S)
    try:
        if scenario == "dp":
            run_dp(comm, out, resume="--resume" in sys.argv and ckpt.latest_checkpoint(out / "checkpoints") is not None,
                   slow="--slow" in sys.argv)
        elif scenario in ("dp-topk", "dp-batchtopk"):
            run_dp_topk(comm, out, scenario.removeprefix("dp-"))
        else:
            run_saes(comm, out)
            run_faults(comm, out)
    finally:
        shutdown_distributed()
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
