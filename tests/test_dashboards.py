"""Dashboards: pages reference plots that exist, contexts are highlighted and escaped, a page
renders in headless Chromium, and `latentpatch dashboards` builds them from the command line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tests.browser import dom, screenshot
from tests.conftest import make_sae

from patching import Site
from patching.inspect.dashboards import highlight, write_dashboards
from patching.inspect.latents import InspectConfig, inspect_latents
from patching.inspect.neuron_cards import NeuronConfig, inspect_units
from patching.inspect.neurons import NeuronDirection, Neuron
from patching.model import tl_compat


@pytest.fixture(scope="module")
def site_book(tmp_path_factory):
    model = tl_compat.random_model(n_layers=2, d_vocab=50, n_ctx=32)
    model.eval()
    site = Site(1, "resid_mid")
    sae = make_sae(16, 40, hook_name=site.hook_name, model_name=model.cfg.model_name, seed=3)
    corpus = torch.randint(1, 50, (4, 10), generator=torch.Generator().manual_seed(2))
    config = NeuronConfig(InspectConfig(k_contexts=4, bins=8), k=8)
    direction = NeuronDirection(site, torch.randn(16, generator=torch.Generator().manual_seed(1)), name="probe")
    reports = inspect_units(model, sae, [Neuron(1, 2), Neuron(1, 9), direction], corpus, config=config)
    reports += inspect_latents(model, sae, [0, 7], corpus, config=config.inspect)
    folder = tmp_path_factory.mktemp("dash")
    return write_dashboards(folder, reports, title="tiny <model>"), reports


def _images(page: Path) -> list[str]:
    return re.findall(r"<img src=[\'\"]([^\'\"]+)[\'\"]", page.read_text())


def test_every_page_is_linked_and_references_existing_pngs(site_book):
    index, reports = site_book
    links = re.findall(r"<a href=[\'\"]([^\'\"]+)[\'\"]>", index.read_text())
    assert len(links) == len(reports) == 5 and "tiny &lt;model&gt;" in index.read_text()
    for link in links:
        page = index.parent / link
        images = _images(page)
        assert images, page
        for image in images:
            assert (page.parent / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    neuron_page = (index.parent / "L1N2.html").read_text()
    assert neuron_page.count("<img") == 2 and "grouped by dominant latent" in neuron_page
    assert "<mark>" in neuron_page and "Direct logit effect" in neuron_page


def test_contexts_are_highlighted_and_escaped():
    assert highlight("a <b> «c&d» e") == "a &lt;b&gt; <mark>c&amp;d</mark> e"


@pytest.mark.browser
def test_a_page_renders_in_headless_chromium(site_book, tmp_path):
    index, _ = site_book
    shot = screenshot(index.parent / "L1N2.html", tmp_path / "shot.png", size="1200,1600")
    import matplotlib.image

    pixels = torch.from_numpy(matplotlib.image.imread(shot))
    assert pixels.shape[:2] == (1600, 1200)
    assert pixels.std() > 0.05  # not a blank page
    # The plots are drawn: measured, the page has ~700 rows holding saturated colour with its PNGs
    # and ~230 (highlights, coloured tokens) with the PNGs deleted.
    colourful = (pixels[..., :3].max(-1).values - pixels[..., :3].min(-1).values) > 0.3
    assert colourful.any(1).sum() > 450
    loaded = dom(index.parent / "L1N2.html")
    assert loaded.count("<img") == 2 and "<mark>" in loaded


@pytest.mark.default_model
def test_cli_builds_dashboards(default_model_4l, tmp_path, monkeypatch):
    from latentpatch.cli import dashboards as cli_inspect, entry as cli

    monkeypatch.setattr(cli_inspect, "load_model_for", lambda sae, name: default_model_4l)
    sae = make_sae(576, 64, hook_name="blocks.2.hook_resid_mid", model_name=default_model_4l.cfg.model_name)
    sae.save(tmp_path / "sae")
    corpus = tmp_path / "texts.txt"
    corpus.write_text("The Eiffel Tower is in Paris.\nThe cat sat on the mat and slept.\ndef f(x):\n    return x + 1\n")
    out = tmp_path / "dash"
    code = cli.main(["dashboards", str(tmp_path / "sae"), "--latents", "3", "--neurons", "10", "--top-neurons", "1",
                     "--text", str(corpus), "--out", str(out), "--contexts", "3", "--n-top", "4", "--json"])
    assert code == 0
    pages = sorted(p.name for p in out.glob("*.html"))
    assert "index.html" in pages and "latent-3.html" in pages and "L2N10.html" in pages and len(pages) == 4
    assert "saes" in (out / "index.html").read_text() and "library_version" in (out / "index.html").read_text()
    assert cli.main(["dashboards", str(tmp_path / "sae"), "--latents", "64", "--text", str(corpus), "--out", str(out)]) == 1


def test_cli_registers_the_dashboards_subcommand(tmp_path):
    from latentpatch.cli import dashboards as cli_inspect, entry as cli

    args = cli.build_parser().parse_args(["dashboards", "some/sae", "--latents", "1", "5", "--top-neurons", "3",
                                          "--out", str(tmp_path), "--json"])
    assert args.run is cli_inspect.run_dashboards
    assert (args.latents, args.neurons, args.top_neurons, args.out) == ([1, 5], [], 3, tmp_path)


def test_a_latent_page_is_its_card_and_escapes_user_text(site_book, tmp_path):
    """Latent pages come from the report's card template; a hostile corpus text or token stays text."""
    import dataclasses

    from patching.inspect.latents import MARK_CLOSE, MARK_OPEN, ActivatingContext, LatentReport

    latent = next(r for r in site_book[1] if isinstance(r, LatentReport))
    payload = "<script>document.title='pwned'</script>"
    hostile = dataclasses.replace(latent, contexts=[ActivatingContext(1.5, 0, 3, payload, f"a {MARK_OPEN}{payload}{MARK_CLOSE} b")])
    index = write_dashboards(tmp_path, [hostile], title=payload)
    for page in (index, tmp_path / f"latent-{latent.latent}.html"):
        text = page.read_text()
        assert "<script>" not in text and "&lt;script&gt;" in text
    card_page = (tmp_path / f"latent-{latent.latent}.html").read_text()
    assert f'id="latent-{latent.latent}"' in card_page and "<mark>&lt;script&gt;" in card_page


def test_a_neuron_page_comes_from_its_template_and_escapes_user_text(site_book, tmp_path):
    """Neuron and direction pages are rendered by the same autoescaped templates as the cards: a hostile
    context or token stays text in every section (contexts, groups, decomposition)."""
    import dataclasses

    from patching.inspect.latents import MARK_CLOSE, MARK_OPEN, ActivatingContext
    from patching.inspect.neuron_cards import UnitReport

    unit = next(r for r in site_book[1] if isinstance(r, UnitReport) and r.groups)
    payload = "<script>document.title='pwned'</script>"
    contexts = [c._replace(text=f"{payload} {MARK_OPEN}{payload}{MARK_CLOSE} b") for c in unit.contexts]
    assert contexts and all(isinstance(c, ActivatingContext) for c in contexts)
    hostile = dataclasses.replace(unit, contexts=contexts)
    write_dashboards(tmp_path, [hostile])
    text = (tmp_path / f"{hostile.label}.html").read_text()
    assert "<script>" not in text and text.count("<mark>&lt;script&gt;") >= len(contexts) + 1  # table + a group
    assert "grouped by dominant latent" in text and "Share of the pre-activation" in text


def test_tokens_the_plot_font_lacks_draw_without_warnings(tmp_path):
    """Real text holds CJK tokens; the suite turns a warning from our code into an error, and the demo
    printed one per missing glyph."""
    import warnings

    import torch

    from patching import Site
    from patching.inspect.dashboards import plot_activity
    from patching.inspect.latents import LatentReport, TokenEffect

    effects = [TokenEffect("息", 1, 1.0)]
    report = LatentReport(1, Site(1), effects, effects, [], torch.ones(3), torch.arange(4.0), 10, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_activity(report, tmp_path / "cjk.png").read_bytes()[:4] == b"\x89PNG"
