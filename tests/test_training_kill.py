"""R8: kill the training process at random moments; the newest checkpoint always loads and the
run, resumed again and again, ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_training_helpers import make_trainer, small_config
from training.trainer import checkpoint as ckpt

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import sys, time
from pathlib import Path
from training import Trainer
from training.trainer import checkpoint
from tests.test_training_helpers import fresh_saes, shuffled_batches, small_config

class Slow:
    def __init__(self, inner): self.inner = inner
    def __iter__(self): return self
    def __next__(self):
        time.sleep(0.05)  # >= 50 ms a step: a kill (one checkpoint + at most 0.25 s) moves at most ~7 of the 40 steps
        return next(self.inner)
    def state_dict(self): return self.inner.state_dict()
    def load_state_dict(self, s): self.inner.load_state_dict(s)
    def describe(self): return self.inner.describe()

out = Path(sys.argv[1])
trainer = Trainer(small_config(total_steps=40, checkpoint_every=1, resample_steps=(4, 20)), fresh_saes(),
                  Slow(shuffled_batches()), out_dir=out)
if checkpoint.latest_checkpoint(out / "checkpoints") is not None:
    trainer.resume()
print("READY", flush=True)
trainer.fit()
print("DONE", flush=True)
"""


def _wait_for_checkpoint_after(folder: Path, step: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        names = [p.name for p in folder.glob("step-*")] if folder.is_dir() else []
        if any(name.split("-")[-1].isdigit() and int(name.split("-")[-1]) > step for name in names):
            return
        time.sleep(0.01)


def _config():
    return small_config(total_steps=40, checkpoint_every=1, resample_steps=(4, 20))


def test_killed_at_random_moments_newest_checkpoint_loads_and_resumes(tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    fingerprint = make_trainer(None, config=_config()).fingerprint
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = random.Random(0)
    steps_seen = []
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, str(script), str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "READY"
        # Let the run write one more checkpoint before the random moment, so that every kill lands
        # mid-run even when a loaded machine makes steps slow (a fixed sleep alone killed some runs
        # before their first step).
        _wait_for_checkpoint_after(out / "checkpoints", steps_seen[-1] if steps_seen else 0, proc)
        time.sleep(rng.uniform(0.0, 0.25))
        proc.kill()
        proc.wait()
        newest = ckpt.latest_checkpoint(out / "checkpoints")
        if newest is not None:
            step, _ = ckpt.load_checkpoint(newest, fingerprint=fingerprint)
            steps_seen.append(step)
    assert steps_seen and steps_seen == sorted(steps_seen) and steps_seen[-1] < 40  # killed mid-run
    done = subprocess.run([sys.executable, str(script), str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "DONE" in done.stdout, done.stderr[-2000:]
    reference = make_trainer(tmp_path / "ref", config=_config())
    reference.fit()
    for index in range(2):
        name = f"sae-{index}/sae_weights.safetensors"
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert (out / "train_log.jsonl").read_text() == (tmp_path / "ref" / "train_log.jsonl").read_text()
