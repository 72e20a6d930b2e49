"""The static HTML report renders in headless Chromium with its plots."""

from __future__ import annotations

import pytest
from PIL import Image

from latentpatch.report import Section, write_report
from tests.browser import dom, screenshot


def red_square(path):
    Image.new("RGB", (300, 200), (220, 20, 20)).save(path)
    return path.name


@pytest.mark.browser
def test_report_renders_with_its_plots(tmp_path):
    name = red_square(tmp_path / "plot.png")
    sections = [Section("Splice metrics", "How the SAE does.", figures={"ce_recovered": 0.91, "l0": 42}, images=[name]),
                Section("Top latents", table=[{"latent": 7, "effect": 0.5}, {"latent": 3, "effect": -0.2}])]
    page = write_report(tmp_path, sections, "latentpatch demo", {"answer": 42})
    loaded = dom(page)
    assert "Splice metrics" in loaded and "plot.png" in loaded and "0.91" in loaded
    shot = Image.open(screenshot(page, tmp_path / "shot.png", size="800,800")).convert("RGB")
    reds = sum(1 for r, g, b in shot.getdata() if r > 200 and g < 60 and b < 60)
    assert reds > 300 * 200 * 0.5  # the plot image was loaded and drawn


def test_missing_images_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        write_report(tmp_path, [Section("x", images=["nothere.png"])], "t", {})
