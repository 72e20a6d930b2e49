"""R8: kill the training process at random moments; the newest checkpoint always loads and the
run, resumed again and again, ends exactly where an uninterrupted run ends.

Each run is its own process, killed with SIGKILL. The processes fork from one multiprocessing
forkserver that imported torch and the trainer once: a fresh interpreter per run spent ~5 s of CPU
importing (training pulls in TransformerLens) before its first step, six times per test."""

from __future__ import annotations

import multiprocessing
import random
import time
from pathlib import Path

import pytest

from tests.test_training_helpers import fresh_saes, make_trainer, shuffled_batches, small_config
from training import Trainer
from training.trainer import checkpoint as ckpt

pytestmark = pytest.mark.slow


class Slow:
    """The batches, at >= 50 ms a step: a kill (one checkpoint + at most 0.25 s) moves at most ~7 of the 40 steps."""

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


def _config():
    return small_config(total_steps=40, checkpoint_every=1, resample_steps=(4, 20))


def train(out: str, ready) -> None:
    """The child process: resume from the newest checkpoint if there is one, say so, train to the end."""
    trainer = Trainer(_config(), fresh_saes(), Slow(shuffled_batches()), out_dir=Path(out))
    if ckpt.latest_checkpoint(Path(out) / "checkpoints") is not None:
        trainer.resume()
    ready.set()
    trainer.fit()


def _forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # torch, training and this module, imported once
    return context


def _wait_for_checkpoint_after(folder: Path, step: int, proc, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.is_alive():
        names = [p.name for p in folder.glob("step-*")] if folder.is_dir() else []
        if any(name.split("-")[-1].isdigit() and int(name.split("-")[-1]) > step for name in names):
            return
        time.sleep(0.01)


def _start(context, out: Path):
    ready = context.Event()
    proc = context.Process(target=train, args=(str(out), ready))
    proc.start()
    return proc, ready


def test_killed_at_random_moments_newest_checkpoint_loads_and_resumes(tmp_path):
    out = tmp_path / "run"
    context = _forkserver()
    fingerprint = make_trainer(None, config=_config()).fingerprint
    rng = random.Random(0)
    steps_seen = []
    for _ in range(5):
        proc, ready = _start(context, out)
        assert ready.wait(120) and proc.is_alive()
        # Let the run write one more checkpoint before the random moment, so that every kill lands
        # mid-run even when a loaded machine makes steps slow (a fixed sleep alone killed some runs
        # before their first step).
        _wait_for_checkpoint_after(out / "checkpoints", steps_seen[-1] if steps_seen else 0, proc)
        time.sleep(rng.uniform(0.0, 0.25))
        proc.kill()  # SIGKILL: no handler, no cleanup, wherever the child was
        proc.join()
        assert proc.exitcode == -9
        newest = ckpt.latest_checkpoint(out / "checkpoints")
        if newest is not None:
            step, _ = ckpt.load_checkpoint(newest, fingerprint=fingerprint)
            steps_seen.append(step)
    assert steps_seen and steps_seen == sorted(steps_seen) and steps_seen[-1] < 40  # killed mid-run
    proc, _ = _start(context, out)
    proc.join(300)
    assert proc.exitcode == 0
    reference = make_trainer(tmp_path / "ref", config=_config())
    reference.fit()
    for index in range(2):
        name = f"sae-{index}/sae_weights.safetensors"
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert (out / "train_log.jsonl").read_text() == (tmp_path / "ref" / "train_log.jsonl").read_text()
