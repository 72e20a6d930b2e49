"""`latentpatch demo` end to end with small settings; its report renders in headless Chromium."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from latentpatch.cli.entry import main
from latentpatch.demo import DemoConfig, demo_sae_dir
from tests.browser import dom, page_widths, screenshot

pytestmark = pytest.mark.slow


@pytest.fixture
def one_thread():
    """Torch on one thread for the demo's run: its small ops on 2 cores shared with anything else stall
    at every OpenMP barrier (the demo test ran over 20 min with two threads beside a harvest)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.default_model
@pytest.mark.browser
def test_small_demo_writes_a_report_that_renders(tmp_path, monkeypatch, capsys, one_thread):
    from latentpatch import demo

    small = dict(layer=4, d_sae=576, train_tokens=20480, batch_size=512, safety_pairs=1, steering_k=(1, 2),
                 steering_coefficients=(4.0,), steering_tokens=3, suite_pairs=3,
                 demo_train_tokens=2048, demo_train_steps=8, sweep_positions=(4, 10))
    # The sweep at the subject's last token and the last position: every position costs ~3x the patches.
    monkeypatch.setattr(demo, "DemoConfig", lambda **kw: DemoConfig(**{**kw, **small}))
    out = tmp_path / "report"
    assert main(["demo", "--out", str(out), "--json"]) == 0
    brief = json.loads(capsys.readouterr().out)
    assert brief["splice_metrics"]["l0"] > 0 and brief["attribution"]["n_checked"] > 0
    results = json.loads((out / "results.json").read_text())
    assert {"training_demo", "splice_metrics", "sweep", "attribution", "steering", "safety"} <= set(results)
    demo_run = results["training_demo"]
    assert demo_run["tokens"] == 2048 and demo_run["history"][-1]["step"] == 8
    assert 0 < demo_run["history"][-1]["l0"] <= 576
    assert {row["position"] for row in results["sweep"]["by_position"]} == {4, 10}
    assert results["sweep"]["units"] > 10 and "at positions [4, 10]" in (out / "index.html").read_text()
    page = out / "index.html"
    html = dom(page)
    for image in ("training.png", "sweep.png", "attribution.png", "steering.png"):
        assert image in html and (out / image).exists()
    shot = Image.open(screenshot(page, tmp_path / "shot.png", size="1200,4000")).convert("RGB")
    colored = sum(1 for r, g, b in shot.getdata() if max(r, g, b) - min(r, g, b) > 60)
    assert colored > 20_000  # the heatmaps and plots were drawn, not just text
    written = page.read_text()
    assert "Summary" in written and 'id="latent-' in written and 'href="#latent-' in written  # latents link to cards
    assert brief["findings"] and brief["findings"][0].startswith("Spliced into the model")
    scroll, client = page_widths(page, width=1280)
    assert scroll <= client  # no sideways scrolling at 1280 px
    assert demo_sae_dir(DemoConfig(**small)).exists()

