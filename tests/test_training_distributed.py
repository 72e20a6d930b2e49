"""torch.distributed training: two gloo ranks on 127.0.0.1, started as torchrun starts them.

- data parallel: a 2-rank run with global batch 32 (16 rows a rank) ends at the SAEs of the
  single-process run with batch 32 on the same rows, to float-reduction tolerance, after one of
  its ranks is killed mid-run, the job fails loudly and bounded in time, and the rerun resumes
  from the last checkpoint; rank 0's log agrees with the single-process log;
- SAE parallel: each rank's SAEs equal the same SAEs trained alone, bit for bit;
- the activation cache written per rank (shards with one manifest) and read per rank;
- Ctrl-C or a non-finite batch on one rank stops every rank at the same step.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sae import load_sae
from training import Trainer
from training.parallel.distributed import assigned, state_from_bytes, state_to_bytes
from training.activations.sources import RowStripe
from tests.distributed_worker import dp_config, sweep_config, sweep_saes
from tests.test_training_helpers import fresh_saes, make_trainer, shuffled_batches, topk_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(*args: str) -> list[subprocess.Popen]:
    """The two ranks of a job, with the environment torchrun gives its workers."""
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(WORLD), "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *args], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str, str]]:
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append((proc.returncode, out, err))
    return results


def _assert_close_saes(folder_a: Path, folder_b: Path, n: int) -> None:
    for index in range(n):
        a, b = load_sae(folder_a / f"sae-{index}"), load_sae(folder_b / f"sae-{index}")
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=f"sae-{index} {name}")


def test_row_stripes_of_two_ranks_are_the_single_process_batches():
    whole, parts = shuffled_batches(), [RowStripe(shuffled_batches(), rank, WORLD) for rank in range(WORLD)]
    for _ in range(6):
        assert torch.equal(next(whole), torch.cat([next(p) for p in parts]))


def test_state_bytes_round_trip_carries_no_pickle():
    state = {"a": torch.arange(5), "b": [1, 2.5, None, "x"], "c": {"d": torch.ones(2, 3)}}
    back = state_from_bytes(state_to_bytes(state))
    assert torch.equal(back["a"], state["a"]) and back["b"] == state["b"]
    assert torch.equal(back["c"]["d"], state["c"]["d"])


def test_killed_rank_fails_the_job_loudly_and_the_rerun_resumes_to_the_single_process_sae(tmp_path):
    out = tmp_path / "dp"
    procs = launch("dp", str(out), "--slow")
    assert all(p.stdout.readline().split()[0] == "READY" for p in procs)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "step-00000004").exists():  # past the first resampling
        assert time.monotonic() < deadline and procs[0].poll() is None, "no checkpoint appeared"
        time.sleep(0.05)
    os.kill(procs[1].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    (code, _, err), (killed, _, _) = finish(procs, timeout=90)  # worker timeout is 30 s: never a hang
    assert killed == -signal.SIGKILL and code != 0, err[-2000:]
    assert time.monotonic() - killed_at < 60
    assert "Error" in err, err[-2000:]  # rank 0 says why it stopped
    assert not (out / "sae-0").exists()
    rerun = launch("dp", str(out), "--resume")
    step = int(rerun[0].stdout.readline().split()[1])
    assert 4 <= step < 24  # resumed from the last checkpoint, not from scratch
    results = finish(rerun)
    assert all(code == 0 and "DONE" in stdout for code, stdout, _ in results), results[0][2][-2000:]

    reference = make_trainer(tmp_path / "ref", config=dp_config())  # one process, batch 32, same rows
    reference.fit()
    assert any(r.get("resampled") for r in reference.history)
    _assert_close_saes(out, tmp_path / "ref", 2)
    ours = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    theirs = reference.history
    assert [sorted(r) for r in ours] == [sorted(r) for r in theirs]
    for mine, ref in zip(ours, theirs):
        for key, value in ref.items():
            assert mine[key] == pytest.approx(value, rel=1e-3, abs=1e-5), (ref["step"], key)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_data_parallel_topk_objectives_equal_the_single_process_run(tmp_path, architecture):
    """AuxK's dead masks agree over ranks, and BatchTopK's selection and running threshold are the
    global batch's: two ranks of 16 rows end at the single-process SAEs of batch 32."""
    results = finish(launch(f"dp-{architecture}", str(tmp_path / "dp")))
    assert all(code == 0 and "DONE" in stdout for code, stdout, _ in results), results[0][2][-2000:]
    reference = make_trainer(tmp_path / "ref", config=topk_config(architecture))
    reference.fit()
    assert any(r.get("auxk_loss", 0) > 0 for r in reference.history)
    _assert_close_saes(tmp_path / "dp", tmp_path / "ref", 2)


def test_data_parallel_differs_from_a_run_on_one_stripe(tmp_path):
    """The comparison above is sharp: rank 0's rows alone (batch 16) give another SAE."""
    reference = make_trainer(tmp_path / "ref", config=dp_config())
    reference.fit()
    alone = Trainer(dp_config(), fresh_saes(), RowStripe(shuffled_batches(), 0, WORLD), out_dir=tmp_path / "one")
    alone.fit()
    with pytest.raises(AssertionError):
        _assert_close_saes(tmp_path / "one", tmp_path / "ref", 2)


def test_sae_parallel_ranks_train_their_saes_as_alone_and_the_cache_is_written_per_rank(tmp_path):
    out = tmp_path / "saes"
    results = finish(launch("saes", str(out)))
    assert all(code == 0 and "DONE" in stdout for code, stdout, _ in results), results[0][2][-2000:]
    for rank in range(WORLD):
        mine = assigned(4, rank, WORLD)
        alone = Trainer(sweep_config(mine), sweep_saes(mine), shuffled_batches(), out_dir=tmp_path / f"alone-{rank}")
        alone.fit()
        for local in range(len(mine)):
            name = f"sae-{local}/sae_weights.safetensors"
            assert (out / f"rank-{rank}" / name).read_bytes() == (tmp_path / f"alone-{rank}" / name).read_bytes()

    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    files = [entry["file"] for entry in manifest["shards"]]
    assert [f[:10] for f in files[:4]] == ["shard-r000", "shard-r001", "shard-r000", "shard-r001"]  # interleaved
    assert all((out / "cache" / f).exists() for f in files) and manifest["n_tokens"] >= 400
    read = [json.loads((out / f"cache-read-{rank}.json").read_text()) for rank in range(WORLD)]
    assert sorted(read[0]["files"] + read[1]["files"]) == sorted(files)  # disjoint stripes covering the cache
    assert read[0]["rows"] + read[1]["rows"] == manifest["n_tokens"]

    # Ctrl-C or a NaN batch on rank 1 alone: both ranks stop at the same step, the same way.
    faults = [json.loads((out / f"faults-{rank}.json").read_text()) for rank in range(WORLD)]
    assert faults[0] == faults[1], faults
    assert faults[0]["sigint"]["error"] == "TrainingInterrupted" and faults[0]["sigint"]["step"] == 5
    assert (out / "fault-sigint" / "checkpoints" / "step-00000005" / "manifest.json").exists()
    assert faults[0]["nan"]["error"] == "NonFiniteError" and faults[0]["nan"]["step"] == 5
    assert "activations" in faults[0]["nan"]["message"]
