"""The static HTML report renders in headless Chromium with its plots, says what was found, links
every latent to its card, escapes user text and fits a 1280 px window."""

from __future__ import annotations

from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from latentpatch.report import Context, LatentCard, Section, cell, demo_summary, quality_sentence, round_sig, write_report
from tests.browser import dom, page_widths, screenshot

XSS = "<script>document.title='pwned'</script><img src=x onerror=alert(1)>"


def red_square(path):
    Image.new("RGB", (300, 200), (220, 20, 20)).save(path)
    return path.name


def fake_results():
    """The shape `run_demo` returns, with made-up numbers."""
    return {"splice_metrics": {"explained_variance": 0.83, "ce_loss_score": 0.95, "kl_div_score": 0.62, "l0": 41.6, "frac_dead": 0.012},
            "sweep": {"contrast": "Paris vs Rome", "units": 900, "top": [
                {"site": "blocks.15.hook_resid_pre", "kind": "error", "position": 5, "token": " Tower", "latent": None, "effect": 0.4},
                {"site": "blocks.15.hook_resid_pre", "kind": "latent", "position": 5, "token": " Tower", "latent": 3465, "effect": 0.0512},
                {"site": "blocks.15.hook_resid_pre", "kind": "latent", "position": 4, "token": " Eiffel", "latent": 12, "effect": -0.02}],
                "by_position": [{"position": 4, "token": " Eiffel", "effect": 0.03}, {"position": 5, "token": " Tower", "effect": 0.31}],
                "joint_top10": 0.274, "error_node": 0.41},
            "attribution": {"spearman": 0.912, "recall_at_k": 0.78, "k": 50, "max_missed_effect": 0.01, "n_checked": 100,
                            "errors_in_top10": 2},
            "seconds": 250.0}


def card(latent, token):
    contexts = [Context(2.5, "The Eiffel", token, " is tall"), Context(1.25, "a ", token, "")]
    return LatentCard(latent, "blocks.15.hook_resid_pre", f"fires on {token!r}", 3, 1000, contexts,
                      [(" Paris", 1.5), (" France", 1.2)], [(" Rome", -1.1), (" Italy", -0.9)], None)


def test_summary_sentences_are_computed_from_the_results():
    results = fake_results()
    text = " ".join(demo_summary(results))
    assert "explained variance 0.83 (good)" in text and "KL score 0.62 (poor)" in text and "CE loss recovered 0.95 (good)" in text
    assert "position 5 (token ' Tower')" in text  # the largest |summed effect|, not the first row
    assert "Latent 3465 alone restores 5%" in text  # the first *latent* row, not the error node above it
    assert "top 10 latents patched jointly restore 27%" in text and "error node alone restores 41%" in text
    assert "Spearman 0.91" in text and "4.2 min" in text
    assert "2 of AtP's 10 largest units are SAE error nodes" in text
    assert "1.2% dead" in text  # no token count: the evaluator's own word
    counted = quality_sentence({"frac_dead": 0.356, "n_tokens": 1043})
    assert counted.endswith("35.6% of latents silent on these 1,043 tokens.")  # a few sentences cannot show dead latents
    results["sweep"]["top"][1]["effect"] = 0.75
    assert "Latent 3465 alone restores 75%" in " ".join(demo_summary(results))
    assert quality_sentence({}) == "" and demo_summary({}) == []


def test_cells_are_for_people():
    assert round_sig(0.123456) == "0.123" and round_sig(1234.5) == "1,234" and round_sig(12345) == "12,345"
    assert round_sig(2.5e-5) == "2.50e-05" and round_sig(0.0) == "0" and round_sig(-3.14159) == "-3.14"
    assert cell({"harmful": 0.66667, "harmless": 0.0}) == "harmful 0.667; harmless 0"
    assert cell(list(range(20))).endswith("(+8 more)") and "{" not in cell([{"n": 1}])


class Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [name for name, _ in attrs]


def wide_report(tmp_path, *, image=True):
    images = [red_square(tmp_path / "plot.png")] if image else []
    results = fake_results()
    steering = [{"k": k, "coefficient": 8.0, "latents": list(range(3465, 3465 + k)), "target_effect": 0.123456 * k,
                 "kl": 0.0345, "note": "x" * 300, **{f"extra_column_{i}": i * 1.5 for i in range(60)}} for k in (1, 4, 16)]
    sections = [Section("SAE at `blocks.15.hook_resid_pre`: splice metrics", "As `latentpatch eval` prints them.",
                        figures=results["splice_metrics"], images=images),
                Section(f"Denoising sweep on {XSS}", f"prompt: {XSS}", table=results["sweep"]["top"]),
                Section("Steering", table=steering)]
    cards = [card(3465, XSS), card(12, " Eiffel")]
    return write_report(tmp_path, sections, "latentpatch demo", results, summary=demo_summary(results), cards=cards,
                        provenance={"model": "SmolLM2-135M-Instruct", "sae": "smollm2-135m-res"})


def test_user_text_is_escaped_and_latents_link_to_cards(tmp_path):
    page = wide_report(tmp_path).read_text()
    found = Elements()
    found.feed(page)
    assert "script" not in found.tags and "onerror" not in found.attrs  # the payload stayed text
    assert "&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;" in page
    assert '<a href="#latent-3465"' in page and 'id="latent-3465"' in page and 'id="latent-12"' in page
    assert page.count('href="#latent-') >= 4  # the sweep's rows and the steering table's latent sets
    assert "(+8 more)" in page  # a 16-latent set is shown compactly
    assert "<code>latentpatch eval</code>" in page and "`" not in page.split("</style>")[1]
    assert "http://" not in page and "https://" not in page  # no CDN: works offline


@pytest.mark.browser
def test_report_renders_with_its_plots(tmp_path):
    page = wide_report(tmp_path)
    loaded = dom(page)
    assert "splice metrics" in loaded and "plot.png" in loaded and "0.830" in loaded
    assert "pwned" not in loaded.split("<title>")[1].split("</title>")[0]
    shot = Image.open(screenshot(page, tmp_path / "shot.png", size="1280,1600")).convert("RGB")
    pixels = np.asarray(shot).reshape(-1, 3).astype(int)
    reds = int(((pixels[:, 0] > 200) & (pixels[:, 1] < 60) & (pixels[:, 2] < 60)).sum())
    assert reds > 300 * 200 * 0.5  # the plot image was loaded and drawn
    assert len(np.unique(pixels, axis=0)) > 8  # text and tables drawn, not a blank page


@pytest.mark.browser
def test_report_fits_1280_px_without_page_overflow(tmp_path):
    scroll, client = page_widths(wide_report(tmp_path, image=False), width=1280)
    assert client > 1000 and scroll <= client  # wide tables scroll inside their own box


@pytest.mark.browser
def test_the_width_probe_sees_overflow(tmp_path):
    page = tmp_path / "wide.html"
    page.write_text("<!doctype html><html><body><div style='width:3000px'>wide</div></body></html>")
    scroll, client = page_widths(page, width=1280)
    assert scroll > client


def test_missing_images_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        write_report(tmp_path, [Section("x", images=["nothere.png"])], "t", {})
    with pytest.raises(FileNotFoundError, match="card.png"):
        bad = card(1, "x")
        bad.image = "card.png"
        write_report(tmp_path, [], "t", {}, cards=[bad])
