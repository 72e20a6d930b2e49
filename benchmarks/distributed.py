"""Data-parallel training throughput: 1 rank against 2 ranks, measured in the same run.

The script starts each job itself, as torchrun would (one process per rank, RANK / WORLD_SIZE /
MASTER_ADDR=127.0.0.1 / MASTER_PORT in the environment, gloo), and each rank trains an L1 SAE of
the default model's shape (d_in 576, d_sae 4608) with `DataParallelTrainer` on in-memory
activations, a global batch of `--batch` rows split evenly over the ranks. The machine's cores are
split evenly too (torch threads per rank = cores // ranks), so the figures compare the same
hardware used by one process or by two.

Per job it reports:
- tokens/s per rank and for the job (global batch x steps / wall time of the measured steps);
- communication share: time rank r spent inside collectives during the measured steps (the
  per-step gradient all-reduce, the 2-flag all-reduce; waiting for a slower rank counts too)
  divided by its step time; the largest over ranks is reported;
- bare all-reduce: the median time of one all-reduce of the SAE's flat gradient buffer
  (d_in*d_sae*2 + d_sae*2 + d_in floats, 21 MB) alone, the cost a faster step would still pay.
On one machine with 2 shared cores no speedup is expected: both jobs use the same cores.

Prints a JSON line last. Run: .venv/bin/python benchmarks/distributed.py [--steps 8] [--batch 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

D_IN, D_SAE = 576, 4608
ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One rank: train `args.steps` measured steps after 2 warm-up steps, write its figures."""
    from sae import SAEConfig, SparseAutoencoder
    from training import TensorBatches, TrainerConfig
    from training.trainer.data_parallel import DataParallelTrainer
    from training.parallel.distributed import init_distributed, shutdown_distributed

    comm = init_distributed(timeout_s=300)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.world_size))
    local = args.batch // comm.world_size
    gen = torch.Generator().manual_seed(comm.rank)
    rows = torch.randn(4 * args.batch // comm.world_size, D_IN, generator=gen) * 3 + 1
    config = TrainerConfig(total_steps=10**6, l1_coefficient=5.0, init_batches=1, checkpoint_every=None,
                           log_every=10**6, progress_bar=False)
    sae = SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE), generator=torch.Generator().manual_seed(0))
    trainer = DataParallelTrainer(config, sae, TensorBatches(rows, local, seed=comm.rank), collective=comm)
    trainer._initialise()
    for _ in range(2):
        trainer._step(trainer._next_batch())
    comm_before, start = comm.comm_seconds, time.perf_counter()
    for _ in range(args.steps):
        trainer._step(trainer._next_batch())
    elapsed = time.perf_counter() - start
    comm_share = (comm.comm_seconds - comm_before) / elapsed
    flat = torch.zeros(sum(p.numel() for p in sae.parameters()) + D_SAE + 2)
    bare = []
    for _ in range(5):
        comm.barrier()
        begin = time.perf_counter()
        comm.all_reduce_sum_(flat)
        bare.append(time.perf_counter() - begin)
    figures = {"rank": comm.rank, "seconds": elapsed, "tokens_per_s_rank": local * args.steps / elapsed,
               "communication_share": comm_share, "allreduce_s": sorted(bare)[2],
               "allreduce_mb": flat.numel() * 4 / 1e6}
    Path(args.figures).write_text(json.dumps(figures))
    shutdown_distributed()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job(world: int, args: argparse.Namespace, folder: Path) -> dict[str, float]:
    """Start `world` ranks on 127.0.0.1 and summarise their figures."""
    port, procs = _free_port(), []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "GLOO_SOCKET_IFNAME": "lo"}
        command = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--batch", str(args.batch),
                   "--figures", str(folder / f"w{world}-r{rank}.json")]
        procs.append(subprocess.Popen(command, env=env, cwd=ROOT))
    for proc in procs:
        if proc.wait(timeout=900) != 0:
            raise RuntimeError(f"a rank of the {world}-rank job exited with status {proc.returncode}")
    ranks = [json.loads((folder / f"w{world}-r{rank}.json").read_text()) for rank in range(world)]
    seconds = max(r["seconds"] for r in ranks)
    return {"ranks": world, "tokens_per_s_rank": round(min(r["tokens_per_s_rank"] for r in ranks), 1),
            "tokens_per_s_job": round(args.batch * args.steps / seconds, 1),
            "step_s": round(seconds / args.steps, 4),
            "communication_share": round(max(r["communication_share"] for r in ranks), 4),
            "allreduce_s": round(max(r["allreduce_s"] for r in ranks), 5),
            "allreduce_mb": round(ranks[0]["allreduce_mb"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="measured steps per job (after 2 warm-up steps)")
    parser.add_argument("--batch", type=int, default=4096, help="global batch (rows per step over all ranks)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--figures", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        one, two = job(1, args, Path(tmp)), job(2, args, Path(tmp))
    for figures in (one, two):
        print(f"{figures['ranks']} rank(s): {figures['tokens_per_s_rank']:.0f} tokens/s per rank, "
              f"{figures['tokens_per_s_job']:.0f} for the job, step {figures['step_s']:.3f} s, "
              f"communication {100 * figures['communication_share']:.1f}% of step time, "
              f"bare all-reduce of {figures['allreduce_mb']} MB {1000 * figures['allreduce_s']:.1f} ms")
    print(json.dumps({"benchmark": "distributed", "d_in": D_IN, "d_sae": D_SAE, "global_batch": args.batch,
                      "steps": args.steps, "cores": os.cpu_count(), "one_rank": one, "two_ranks": two,
                      "speedup_job": round(two["tokens_per_s_job"] / one["tokens_per_s_job"], 3)}))


if __name__ == "__main__":
    main()
