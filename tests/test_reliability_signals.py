"""SIGTERM is handled like Ctrl-C (issue 30, item 9; RELIABILITY.md R3, R8, R11).

`kill PID`, a scheduler ending a job, or `timeout` send SIGTERM, which by default ends Python at
once: `train` lost the steps since its last checkpoint and left what it was writing. Now training
finishes the running step, writes a checkpoint and stops with `TrainingInterrupted`, restoring the
handlers it replaced; the resumed run ends bit-identical to an uninterrupted one. `harvest`, on
SIGTERM or Ctrl-C alike, stops with the tokens in hand and leaves exact caches: the same caches a
harvest of that many tokens writes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import stub_model_loader
from tests.test_training_helpers import SignallingBatches, fresh_saes, make_trainer, same_run, shuffled_batches, small_config
from training import Trainer, TrainingInterrupted
from worded_model import worded_model

ROOT = Path(__file__).resolve().parents[1]


def test_sigterm_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path):
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    cfg = small_config(checkpoint_every=None)  # the only checkpoint is the one SIGTERM writes
    trainer = Trainer(cfg, fresh_saes(), SignallingBatches(shuffled_batches(), at=cfg.init_batches + 6, signum=signal.SIGTERM), out_dir=tmp_path)
    with pytest.raises(TrainingInterrupted) as err:
        trainer.fit()
    assert err.value.step == 6 and err.value.checkpoint.name == "step-00000006"
    assert {number: signal.getsignal(number) for number in before} == before
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000006"]  # no temporary folder
    resumed = Trainer(cfg, fresh_saes(), SignallingBatches(shuffled_batches(), at=-1, signum=signal.SIGTERM), out_dir=tmp_path)
    assert resumed.resume() == 6
    resumed.fit()
    reference = make_trainer(tmp_path / "ref", config=cfg)
    reference.fit()
    assert same_run(reference, resumed)


SCRIPT = """
import sys, time
from pathlib import Path
from training import Trainer, TrainingInterrupted
from tests.test_training_helpers import fresh_saes, shuffled_batches, small_config

class Slow:
    def __init__(self, inner): self.inner, self.n = inner, 0
    def __iter__(self): return self
    def __next__(self):
        self.n += 1
        if self.n == 6:
            print("STEPPING", flush=True)
        time.sleep(0.05)
        return next(self.inner)
    def state_dict(self): return self.inner.state_dict()
    def load_state_dict(self, s): self.inner.load_state_dict(s)
    def describe(self): return self.inner.describe()

out = Path(sys.argv[1])
trainer = Trainer(small_config(total_steps=40, checkpoint_every=None), fresh_saes(), Slow(shuffled_batches()),
                  out_dir=out)
try:
    trainer.fit()
except TrainingInterrupted as err:
    print("STOPPED", err.step, flush=True)
    sys.exit(3)
print("DONE", trainer.step, flush=True)  # not reached: the test stops it
"""


@pytest.mark.slow
def test_kill_sigterm_in_a_real_process_checkpoints_and_resumes_exactly(tmp_path):
    """A real `kill -TERM` from outside, mid-run: the child writes a checkpoint at the step it was on,
    exits through TrainingInterrupted, and the run resumed from it ends as an uninterrupted one."""
    out, script = tmp_path / "run", tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "STEPPING"
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, (proc.returncode, stderr[-2000:])
    step = int(stdout.split()[-1])
    assert 0 < step < 40
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{step:08d}"]
    assert not list(out.glob("sae*"))  # nothing half-written beside the checkpoint
    config = small_config(total_steps=40, checkpoint_every=None)
    resumed = Trainer(config, fresh_saes(), shuffled_batches(), out_dir=out)
    assert resumed.resume() == step
    resumed.fit()
    reference = make_trainer(tmp_path / "ref", config=config)
    reference.fit()
    assert same_run(reference, resumed)
    assert (out / "train_log.jsonl").read_text() == (tmp_path / "ref" / "train_log.jsonl").read_text()


def _harvest(argv: list[str], capsys) -> dict:
    from latentpatch.cli.entry import main

    assert main(["harvest", *argv, "--json", "--no-progress"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_stops_a_harvest_with_exact_caches(tmp_path, monkeypatch, capsys, number):
    """SIGTERM or Ctrl-C during `harvest` (at its third forward pass) ends it with the tokens in hand:
    exit 0, `stopped_early`, and caches equal, shard for shard, to a harvest asked for that many tokens.
    (Ctrl-C used to abort, leaving shards without a manifest.)"""
    from patching.model import tl_compat

    model = worded_model(tmp_path / "tokenizer")
    calls = stub_model_loader(monkeypatch, lambda *args, **kwargs: model)
    text = tmp_path / "words.txt"
    text.write_text("\n\n".join(" ".join(f"w{(7 * d + i) % 47}" for i in range(30)) for d in range(40)) + "\n")
    before = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGTERM)}
    forwards: list[int] = []

    def terminate_on_third(act):
        forwards.append(1)
        if len(forwards) == 3:
            signal.raise_signal(number)

    common = ["--sites", "1", "--text", str(text), "--context-size", "8", "--rows-per-chunk", "2"]
    handle = tl_compat.attach_hook(model, "hook_embed", terminate_on_third)
    try:
        stopped = _harvest([*common, "--tokens", "100000", "--out", str(tmp_path / "a")], capsys)
    finally:
        handle.remove()
    assert calls and {n: signal.getsignal(n) for n in before} == before
    assert stopped["stopped_early"] and 0 < stopped["tokens_per_site"] < 100000
    again = _harvest([*common, "--tokens", str(stopped["tokens_per_site"]), "--out", str(tmp_path / "b")], capsys)
    assert not again["stopped_early"]
    hook = "blocks.1.hook_resid_pre"
    shards = [json.loads((tmp_path / run / hook / "manifest.json").read_text())["shards"] for run in ("a", "b")]
    assert [s["sha256"] for s in shards[0]] == [s["sha256"] for s in shards[1]]
