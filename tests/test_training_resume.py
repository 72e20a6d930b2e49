"""Exact resume (R9), Ctrl-C (R11) and the non-finite guard (R10) on tiny synthetic data."""

from __future__ import annotations

import signal

import pytest
import torch

from tests.test_training_helpers import (BATCH, D_IN, SignallingBatches, fresh_saes, make_trainer, same_run, shuffled_batches, small_config,
                                         topk_config)
from training import CheckpointError, NonFiniteError, Trainer, TrainingInterrupted
from training.errors import TrainingConfigError
from training.trainer import checkpoint as ckpt
from training.trainer.metrics import FiringTracker


@pytest.mark.parametrize("source", ["shuffled", "global_rng"])
def test_resume_equals_uninterrupted_run(tmp_path, source):
    reference = make_trainer(tmp_path / "ref", source=source)
    reference.fit()
    assert any(r.get("resampled") for r in reference.history), "the run must exercise resampling"
    first = make_trainer(tmp_path / "run", source=source)
    first.fit(until_step=8)
    torch.manual_seed(999)  # disturb the global RNG between the two halves, as a new process would
    resumed = make_trainer(tmp_path / "run", source=source)
    assert resumed.resume() == 8
    resumed.fit()
    assert same_run(reference, resumed)
    log_lines = (tmp_path / "run" / "train_log.jsonl").read_text()
    assert log_lines == (tmp_path / "ref" / "train_log.jsonl").read_text()


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_resume_equals_uninterrupted_run_for_topk_objectives(tmp_path, architecture):
    """R9 for TopK and BatchTopK: AuxK's dead masks, unit decoder rows and BatchTopK's running
    threshold all come back exactly."""
    config = topk_config(architecture)
    reference = make_trainer(tmp_path / "ref", config=config)
    reference.fit()
    assert any(r.get("auxk_loss", 0) > 0 for r in reference.history), "the run must exercise AuxK"
    first = make_trainer(tmp_path / "run", config=config)
    first.fit(until_step=7)
    torch.manual_seed(999)
    resumed = make_trainer(tmp_path / "run", config=config)
    assert resumed.resume() == 7
    resumed.fit()
    assert same_run(reference, resumed)
    assert (tmp_path / "run" / "train_log.jsonl").read_text() == (tmp_path / "ref" / "train_log.jsonl").read_text()
    if architecture == "batchtopk":
        threshold = reference.members[0].sae.threshold
        assert threshold.min() > 0 and torch.equal(threshold, threshold[:1].expand_as(threshold))


def _drop(piece: str, trainer: Trainer):
    """Wrap load_state_dict so that one piece of the saved state is not restored."""
    original = trainer.load_state_dict

    def load(state):
        if piece == "optimizer":
            for saved in state["saes"]:
                saved["optimizer"]["state"] = {}
        elif piece == "firing":
            for saved in state["saes"]:
                saved["firing"] = FiringTracker(saved["firing"]["window_counts"].shape[0]).state_dict()
        elif piece == "generator":
            state["generator"] = torch.Generator().manual_seed(trainer.config.seed).get_state()
        elif piece == "data":
            state["data"], state["batches_consumed"] = None, 0
        elif piece == "rng":
            state["rng"] = ckpt.rng_state()
        original(state)

    trainer.load_state_dict = load
    return trainer


# Stop where the piece matters: firing counters before the first resampling (step 4) decides
# which latents are dead; the resampling generator after it has drawn.
@pytest.mark.parametrize("piece, source, stop", [("optimizer", "shuffled", 8), ("firing", "shuffled", 3),
                                                 ("generator", "shuffled", 8), ("data", "shuffled", 8),
                                                 ("rng", "global_rng", 8)])
def test_resume_check_fails_when_a_piece_of_state_is_left_out(tmp_path, piece, source, stop):
    """The comparison above is sharp: leaving any one piece out of the checkpoint breaks it."""
    reference = make_trainer(tmp_path / "ref", source=source)
    reference.fit()
    make_trainer(tmp_path / "run", source=source).fit(until_step=stop)
    torch.manual_seed(999)
    resumed = _drop(piece, make_trainer(tmp_path / "run", source=source))
    resumed.resume()
    resumed.fit()
    assert not same_run(reference, resumed)


def test_resume_with_changed_config_is_refused(tmp_path):
    make_trainer(tmp_path, config=small_config()).fit(until_step=4)
    changed = make_trainer(tmp_path, config=small_config(lr=2e-2))
    with pytest.raises(CheckpointError, match="another configuration"):
        changed.resume()


def test_last_two_checkpoints_kept_and_newest_used(tmp_path):
    trainer = make_trainer(tmp_path, config=small_config(checkpoint_every=2))
    trainer.fit()
    names = [p.name for p in ckpt.checkpoint_dirs(tmp_path / "checkpoints")]
    assert names == ["step-00000014", "step-00000016"]
    (tmp_path / "checkpoints" / "step-00000016" / "state.json").write_text("{}")  # corrupt the newest
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").name == "step-00000014"


def test_ctrl_c_finishes_step_checkpoints_and_restores_handler(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    cfg = small_config()
    trainer = Trainer(cfg, fresh_saes(), SignallingBatches(shuffled_batches(), at=cfg.init_batches + 6, signum=signal.SIGINT),
                      out_dir=tmp_path)
    with pytest.raises(TrainingInterrupted) as err:
        trainer.fit()
    assert err.value.step == 6 and err.value.checkpoint.name == "step-00000006"
    assert signal.getsignal(signal.SIGINT) is before
    resumed = Trainer(cfg, fresh_saes(), SignallingBatches(shuffled_batches(), at=-1, signum=signal.SIGINT), out_dir=tmp_path)
    assert resumed.resume() == 6
    resumed.fit()
    reference = make_trainer(tmp_path / "ref")
    reference.fit()
    assert same_run(reference, resumed)


@pytest.mark.parametrize("poison, tensor", [(float("nan"), "activations"), (1e30, "loss of SAE 0")])
def test_non_finite_stops_at_its_step_with_checkpoint_untouched(tmp_path, poison, tensor):
    cfg = small_config(checkpoint_every=5)

    def batches():
        source = shuffled_batches()
        for index in range(100):
            batch = next(source).clone()
            if index == cfg.init_batches + 6:  # the batch of step 7
                batch[3, 2] = poison
            yield batch

    trainer = Trainer(cfg, fresh_saes(), batches(), out_dir=tmp_path)
    saved = {}
    original = trainer._step

    def step(x):
        saved.update({k: v.clone() for k, v in trainer.members[0].sae.state_dict().items()})
        return original(x)

    trainer._step = step
    with pytest.raises(NonFiniteError) as err:
        trainer.fit()
    assert err.value.step == 7 and tensor in str(err.value)
    for name, value in trainer.members[0].sae.state_dict().items():
        assert torch.isfinite(value).all() and torch.equal(value, saved[name]), name
    folder = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert folder.name == "step-00000005"
    step, _ = ckpt.load_checkpoint(folder, fingerprint=trainer.fingerprint)
    assert step == 5


def test_bad_batch_shape_is_refused(tmp_path):
    trainer = Trainer(small_config(), fresh_saes(), iter([torch.zeros(BATCH, D_IN + 1)] * 4))
    with pytest.raises(Exception, match=f"expected \\(batch, {D_IN}\\)"):
        trainer.fit()


def test_exhausted_iterator_is_an_error_with_the_run_checkpointed(tmp_path):
    source = shuffled_batches()
    batches = iter([next(source) for _ in range(small_config().init_batches + 5)])
    trainer = Trainer(small_config(checkpoint_every=None), fresh_saes(), batches, out_dir=tmp_path)
    with pytest.raises(Exception, match="ended after 7 batches, before step 16; checkpoint .*step-00000005"):
        trainer.fit()


def test_non_finite_in_one_sae_leaves_every_sae_unchanged(tmp_path):
    # Issue 17: SAE 1's huge L1 coefficient overflows; SAE 0 (stepped first) must not move either.
    trainer = Trainer(small_config(l1_coefficient=(0.5, 1e38), checkpoint_every=None), fresh_saes(), shuffled_batches())
    saved = []
    original = trainer._step

    def step(x):
        saved[:] = [{k: v.clone() for k, v in m.sae.state_dict().items()} for m in trainer.members]
        return original(x)

    trainer._step = step
    with pytest.raises(NonFiniteError, match="SAE 1") as err:
        trainer.fit()
    assert trainer.step == err.value.step - 1
    for member, before in zip(trainer.members, saved, strict=True):
        for name, value in member.sae.state_dict().items():
            assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("field, value", [("lr", float("inf")), ("lr", float("nan")), ("grad_clip_norm", float("inf")),
                                          ("l1_coefficient", float("inf")), ("l1_coefficient", (0.5, float("nan"))),
                                          ("decoder_init_norm", float("inf")), ("resample_encoder_scale", float("nan"))])
def test_non_finite_settings_are_refused_by_the_config(field, value):
    with pytest.raises(TrainingConfigError, match=f"TrainerConfig.{field} must be .*finite.*got"):
        small_config(**{field: value})
