"""Training metrics, initialisation and schedules against hand-computed values (R14)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import construct_unchecked
from training import TrainerConfig, TrainingConfigError
from training.trainer.init import geometric_median, normalization_scale
from training.trainer.metrics import FiringTracker, batch_metrics


def test_batch_metrics_match_hand_computed_values():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    x_hat = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    z = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]])
    norms = torch.tensor([1.0, 0.5, 2.0])
    m = batch_metrics(x, x_hat, z, norms)
    # errors: (0,-1), (1,0) -> SSE 2 over 4 elements; mean (2,1) -> total SS 2+2 = 4.
    assert m["mse"] == pytest.approx(0.5)
    assert m["explained_variance"] == pytest.approx(1 - 2 / 4)
    assert m["l0"] == pytest.approx(1.5)
    # L1: token 0: 2*0.5 = 1; token 1: 1*1 + 3*2 = 7; mean 4.
    assert m["l1"] == pytest.approx(4.0)


def test_logged_mse_is_in_the_activations_units_like_the_evaluations():
    """The trainer works on x / scale; its logged MSE must be the same quantity as eval/mse
    (splice metrics on the raw activations), not the normalized one beside it."""
    from patching.splice.quality import mse

    x, x_hat = torch.tensor([[1.0, 0.0], [3.0, 2.0]]), torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    z, norms = torch.zeros(2, 3), torch.ones(3)
    scale = 4.0
    normalized = batch_metrics(x / scale, x_hat / scale, z, norms, scale=scale)
    assert normalized["mse"] == pytest.approx(mse(x, x_hat).item())
    assert normalized["explained_variance"] == pytest.approx(batch_metrics(x, x_hat, z, norms)["explained_variance"])


def test_firing_tracker_dead_and_dense_fractions():
    tracker = FiringTracker(4)
    tracker.update_(torch.tensor([5, 0, 1, 0]), 10)
    tracker.update_(torch.tensor([6, 0, 0, 1]), 10)
    assert tracker.tokens_since_fired.tolist() == [0, 20, 10, 0]
    assert tracker.dead_fraction(20) == pytest.approx(0.25)  # latent 1: 20 tokens without firing
    assert tracker.dead_fraction(10) == pytest.approx(0.5)  # latents 1 and 2
    # Frequencies over the 20 tokens: 11/20, 0, 1/20, 1/20.
    assert tracker.dense_fraction(0.5) == pytest.approx(0.25)
    assert tracker.dense_fraction(0.04) == pytest.approx(0.75)
    tracker.reset_window_()
    assert tracker.dense_fraction(0.0) == 0.0
    tracker.revive_(torch.tensor([False, True, False, False]))
    assert tracker.tokens_since_fired.tolist() == [0, 0, 10, 0]


def test_normalization_scale_gives_norm_sqrt_d_in():
    x = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 6.0, 8.0]])  # norms 5 and 10
    s = normalization_scale(x)
    assert s == pytest.approx(7.5 / 2)
    assert (x / s).norm(dim=-1).mean().item() == pytest.approx(math.sqrt(4))


def test_geometric_median_ignores_an_outlier_the_mean_follows():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1000.0, 1000.0]])
    median = geometric_median(x)
    # Four corners of the unit square and one far point on the diagonal: the median is (t, t) where
    # the five unit vectors sum to zero, -1 + 1 + 1 + 2(1 - 2t) / sqrt(2 (t^2 + (1 - t)^2)) = 0, so
    # t = 1/2 + 1/(2 sqrt 3) however far the outlier sits.
    t = 0.5 + 1 / (2 * math.sqrt(3))
    assert torch.allclose(median, torch.tensor([t, t]), rtol=0, atol=1e-5)
    assert torch.allclose(geometric_median(torch.cat([x[:4], torch.tensor([[50.0, 50.0]])])), median, rtol=0, atol=1e-5)
    assert x.mean(0)[0] > 100
    symmetric = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -2.0], [0.0, 2.0]])
    assert torch.allclose(geometric_median(symmetric), torch.zeros(2), atol=1e-5)


def test_schedules_hand_computed():
    cfg = TrainerConfig(total_steps=100, lr=1.0, lr_warmup_fraction=0.1, lr_decay_fraction=0.2,
                        l1_warmup_fraction=0.05, progress_bar=False)
    assert (cfg.lr_warmup_steps, cfg.lr_decay_steps, cfg.l1_warmup_steps) == (10, 20, 5)
    assert cfg.lr_at(1) == pytest.approx(0.1)
    assert cfg.lr_at(10) == pytest.approx(1.0)
    assert cfg.lr_at(50) == pytest.approx(1.0)
    assert cfg.lr_at(80) == pytest.approx(1.0)
    assert cfg.lr_at(81) == pytest.approx(20 / 21)
    assert cfg.lr_at(100) == pytest.approx(1 / 21)
    assert [cfg.l1_scale_at(s) for s in (1, 5, 6)] == pytest.approx([0.2, 1.0, 1.0])


@pytest.mark.parametrize("values, field", [
    (dict(total_steps=0), "total_steps"),
    (dict(total_steps=10, keep_checkpoints=1), "keep_checkpoints"),
    (dict(total_steps=10, lr_warmup_fraction=0.6, lr_decay_fraction=0.6), "lr_warmup_fraction"),
    (dict(total_steps=10, l1_coefficient=-1.0), "l1_coefficient"),
    (dict(total_steps=10, resample_steps=(5, 3)), "resample_steps"),
    (dict(total_steps=10, resample_steps=(10,)), "resample_steps"),
    (dict(total_steps=10, normalization="batchnorm"), None),
])
def test_config_refuses_inconsistent_values(values, field):
    with pytest.raises(TrainingConfigError) as err:
        construct_unchecked(TrainerConfig, **values)
    if field is not None:
        assert field in str(err.value)


def test_l1_sweep_needs_one_value_per_sae():
    cfg = TrainerConfig(total_steps=10, l1_coefficient=(1.0, 2.0))
    assert cfg.l1_for(2) == (1.0, 2.0)
    with pytest.raises(TrainingConfigError, match="2 values but 3 SAEs"):
        cfg.l1_for(3)
