"""Site: the typed hook-site constructor."""

from __future__ import annotations

import pytest

from patching import Site, SiteError
from tests.conftest import construct_unchecked


def test_hook_names_and_round_trip(tiny_model):
    for kind in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_pre", "mlp_post"):
        site = Site(1, kind)
        assert site.hook_name in tiny_model.hook_dict
        assert Site.from_hook_name(site.hook_name) == site
        assert site.check(tiny_model) is site
    assert Site(2).hook_name == "blocks.2.hook_resid_pre"
    # Each kind names TransformerLens's own hook for it (membership alone passed with resid_mid and
    # resid_post swapped, or mlp_pre and mlp_post).
    from transformer_lens.utils import get_act_name

    tl_names = {"mlp_pre": "pre", "mlp_post": "post", "head_out": "z"}
    for kind in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_pre", "mlp_post", "z", "q", "k", "v"):
        assert Site(1, kind).hook_name == get_act_name(tl_names.get(kind, kind), 1), kind
    assert Site(1, "pattern", head=0).hook_name == get_act_name("pattern", 1)
    assert Site(1, "head_out", head=0).hook_name == get_act_name("z", 1)
    assert Site(0, "mlp_post").width(tiny_model) == tiny_model.cfg.d_mlp
    assert Site(0, "resid_post").width(tiny_model) == tiny_model.cfg.d_model


@pytest.mark.parametrize("make,pattern", [
    (lambda: Site(-1), "non-negative"),
    (lambda: construct_unchecked(Site, layer=1, kind="resid"), "valid kinds: resid_pre"),
    (lambda: Site.from_hook_name("blocks.x.hook_resid_pre"), "cannot read a site"),
    (lambda: Site.from_hook_name("blocks.1.attn.hook_pattern"), "suffix one of"),
])
def test_bad_sites_raise_with_choices(make, pattern):
    with pytest.raises(SiteError, match=pattern):
        make()


def test_out_of_range_layer_lists_valid_range(tiny_model):
    with pytest.raises(SiteError, match=r"layers 0\.\.2"):
        Site(3).check(tiny_model)


def test_no_other_module_builds_hook_names():
    import re
    from pathlib import Path

    # An f-string or a literal that starts a hook name ("blocks.6...") outside hook_names.py builds one.
    building = re.compile(r"""f["']blocks\.|["']blocks\.(\d|\{)|["']blocks\.["']\s*\+""")
    root = Path(__file__).resolve().parents[1]
    offenders = [f"{path}:{n}" for package in ("sae", "patching", "training", "latentpatch")
                 for path in (root / package).rglob("*.py") if path.name != "hook_names.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if building.search(line)]
    assert offenders == []
    assert building.search('name = f"blocks.{layer}.hook_resid_pre"') and building.search("'blocks.3.attn'")
