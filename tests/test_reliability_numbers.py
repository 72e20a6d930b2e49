"""Absurd numbers are refused while the arguments are read, before anything loads (issue 30, item 9).

`dashboards --top-latents=-3` meant "all but 3" (2,301 pages written before it was stopped),
`patch --top -5` listed all but five, `attribute --steps 1e8` asked the allocator for 10 TB,
`steer --seed 2**70` failed after the model loaded, `--verify -3` after the attribution ran, and
`train --buffer-tokens 1e12` or a batch of 1e9 activations never finished. Library configs refuse
their non-finite numbers when built.
"""

from __future__ import annotations

import pytest
import torch

from hooks_snapshot import assert_refused_before_any_forward
from latentpatch.cli.entry import main
from patching import LogitDiff, PatchingError, attribute_latents
from patching.attribution.estimators import MAX_IG_STEPS
from patching.safety import SafetyConfig
from tests.conftest import construct_unchecked

CASES = [
    (["dashboards", "sae", "--top-latents=-3", "--out", "d"], "argument --top-latents: must be in [0, 100000], got -3"),
    (["dashboards", "sae", "--top-neurons", "-1", "--out", "d"], "argument --top-neurons: must be in [0, 100000]"),
    (["patch", "sae", "--top", "-5"], "argument --top: must be in [1, 100000], got -5"),
    (["attribute", "sae", "--method", "ig", "--steps", "100000000"], f"argument --steps: must be in [1, {MAX_IG_STEPS}]"),
    (["attribute", "sae", "--verify", "-3"], "argument --verify: must be in [0, 100000], got -3"),
    (["steer", "sae", "--seed", str(2 ** 70)], "argument --seed: must be in [0, 9223372036854775807]"),
    (["trace", "--seed", "-1"], "argument --seed: must be in [0, "),
    (["train", "--site", "1", "--tokens", "10", "--out", "o", "--buffer-tokens", str(10 ** 12)], "--buffer-tokens: must be in"),
    (["train", "--site", "1", "--tokens", "10", "--out", "o", "--batch-size", str(10 ** 9)], "--batch-size: must be in"),
    (["train", "--site", "1", "--tokens", str(2 ** 41), "--out", "o"], "argument --tokens: must be in [1, 1099511627776]"),
    (["harvest", "--sites", "1", "--tokens", "0", "--out", "o"], "argument --tokens: must be in [1, "),
    (["patch", "sae", "--top", "1e3"], "argument --top: expected an integer, got '1e3'"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(argv[:1] + argv[-2:]) for argv, _ in CASES])
def test_the_cli_refuses_absurd_numbers_in_one_line_before_loading(argv, message, capsys, monkeypatch):
    import patching.model.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("field,value", [("overshoot_margin", float("nan")), ("overshoot_margin", float("inf")),
                                         ("overshoot_margin", -0.1), ("span_threshold", float("inf"))])
def test_safety_config_refuses_non_finite_numbers(field, value):
    with pytest.raises(PatchingError, match=f"SafetyConfig.{field} must be"):
        construct_unchecked(SafetyConfig, **{field: value})


def test_attribution_bounds_its_integrated_gradient_steps(tiny_model, tiny_sae):
    clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 2, 5, 4]])  # tiny models have no tokenizer
    assert_refused_before_any_forward(
        tiny_model, lambda: attribute_latents(tiny_model, tiny_sae, clean, corrupted, LogitDiff(3, 4), method="ig",
                                              steps=MAX_IG_STEPS + 1, progress=False),
        PatchingError, f"steps must be a positive int at most {MAX_IG_STEPS}")
