"""The library leaves the caller's world as it found it (STYLE.md rule 20): plotting keeps the user's
matplotlib backend and registers no figure with pyplot; sampling leaves torch's global RNG state alone."""

from __future__ import annotations

import ast
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("sae", "patching", "training", "latentpatch")


def _restoration_plot(path: Path) -> Path:
    from patching.attribution.plots import plot_restoration_curves
    from patching.attribution.restoration import RestorationCurve

    curve = RestorationCurve(counts=[1, 2, 4], fraction=torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.6, 1.0]]), n_active=[8, 8])
    return plot_restoration_curves({"SAE latents": curve}, path, title="t", ylabel="restored")


def _safety_plot(path: Path) -> Path:
    from patching.safety.curves import UnitCurve
    from patching.safety.report import plot_curves

    curve = UnitCurve(kind="latents", percents=[10.0, 50.0], fraction=torch.tensor([[0.2, 0.8]]), n_active=[10], pairs=[0])
    return plot_curves([curve], path, title="t")


def _comparison_plot(path: Path) -> Path:
    from patching.steering.plots import plot_comparison

    table = pd.DataFrame({"method": ["none", "sae", "sae"], "k": [0, 1, 1], "coefficient": [0.0, 1.0, 2.0],
                          "kl_neutral": [0.0, 0.1, 0.3], "gen_perplexity": [10.0, 12.0, 20.0],
                          "target_effect": [0.0, 0.5, 1.0]})
    return plot_comparison(table, path, title="t")


def _training_plot(path: Path) -> Path:
    from latentpatch.demo_report import plot_training

    plot_training([{"step": s, "mse": 1.0 / (s + 1), "explained_variance": s / 4, "l0": 10.0 - s} for s in range(4)], path)
    return path


@pytest.mark.parametrize("draw", [_restoration_plot, _safety_plot, _comparison_plot, _training_plot])
def test_plotting_keeps_the_users_backend(draw, tmp_path):
    """A Jupyter user's backend (here "pdf", a non-interactive one every install has) survives a plot,
    and no figure is left in pyplot's registry (where a notebook would display or leak it)."""
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        figures = plt.get_fignums()
        path = draw(tmp_path / "plot.png")
        assert matplotlib.get_backend() == "pdf"
        assert plt.get_fignums() == figures
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        matplotlib.use(before)


def test_no_library_module_touches_pyplot_or_the_backend():
    """Every plot in the library draws on `matplotlib.figure.Figure` (through patching.figures):
    no `matplotlib.use(...)` and no `matplotlib.pyplot` import anywhere in the packages."""
    offenders = []
    for package in LIBRARY:
        for file in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(file.read_text(), filename=str(file))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
                if any(name.startswith("matplotlib.pyplot") for name in names):
                    offenders.append(f"{file.relative_to(ROOT)}:{node.lineno} imports pyplot")
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "use"
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "matplotlib"):
                    offenders.append(f"{file.relative_to(ROOT)}:{node.lineno} calls matplotlib.use")
    assert not offenders, offenders


@pytest.fixture(scope="module")
def rotary_model():
    from patching.model import tl_compat

    model = tl_compat.random_model(n_layers=2, d_vocab=50, n_ctx=32, positional_embedding_type="rotary", rotary_dim=4)
    model.eval()
    return model


@pytest.fixture(scope="module")
def prompts():
    return torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(3))


def _tl_sampled(model, prompts, seed: int, **kwargs) -> torch.Tensor:
    """TransformerLens's own sampling loop under `torch.manual_seed(seed)`, in a forked RNG (the reference)."""
    from patching.model import tl_compat

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return tl_compat.generate(model, prompts, max_new_tokens=4, do_sample=True, **kwargs)


@pytest.mark.parametrize("top_p", [None, 0.7])
def test_generate_steered_leaves_the_global_rng_alone(rotary_model, prompts, top_p):
    """`seed=` samples from a private `torch.Generator`: the caller's RNG stream is untouched, the same
    seed reproduces, another seed differs, and the unsteered samples are TransformerLens's under
    `torch.manual_seed(seed)`."""
    from tests.conftest import make_sae

    from patching.steering.steer import generate_steered

    sae = make_sae(16, 32, hook_name="blocks.1.hook_resid_pre", model_name=rotary_model.cfg.model_name)
    kwargs = dict(max_new_tokens=4, do_sample=True, temperature=1.5, top_p=top_p, coefficient=3.0)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = generate_steered(rotary_model, sae, [0, 5], prompts, seed=7, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    again = generate_steered(rotary_model, sae, [0, 5], prompts, seed=7, **kwargs)
    assert torch.equal(first.steered_tokens, again.steered_tokens)
    assert torch.equal(first.unsteered_tokens, _tl_sampled(rotary_model, prompts, 7, temperature=1.5, top_p=top_p))
    other = generate_steered(rotary_model, sae, [0, 5], prompts, seed=8, **kwargs)
    assert not torch.equal(first.unsteered_tokens, other.unsteered_tokens)
    assert torch.equal(torch.get_rng_state(), state)


def test_steering_generate_leaves_the_global_rng_alone(rotary_model, prompts):
    """`Steering.generate(seed=...)` (coefficient 0: the model's own distribution) equals
    TransformerLens's sampling under that seed and leaves the caller's RNG state as it was."""
    from tests.conftest import make_sae

    from patching.steering.steer import steer

    sae = make_sae(16, 32, hook_name="blocks.1.hook_resid_pre", model_name=rotary_model.cfg.model_name)
    state = torch.get_rng_state()
    with steer(rotary_model, sae, [3], method="add", coefficient=0.0) as steering:
        tokens = steering.generate(prompts, max_new_tokens=4, do_sample=True, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(tokens, _tl_sampled(rotary_model, prompts, 11))


@pytest.mark.default_model
def test_compare_steering_leaves_the_global_rng_alone(default_model_4l):
    """compare_steering samples its continuations per seed from its own generator; its table still
    reproduces from one call to the next."""
    from tests.conftest import make_sae

    from patching.steering.compare import CompareSettings, Concept, compare_steering

    concept = Concept(name="paris", positive=["The Eiffel Tower stands in Paris."], negative=["Big Ben stands in London."],
                      target_tokens=[" Paris"], heldout=["My favourite city is"], neutral=["The cat sat on the mat."])
    sae = make_sae(576, 64, hook_name="blocks.2.hook_resid_pre", model_name=default_model_4l.cfg.model_name)
    settings = CompareSettings(seeds=(0, 1), max_new_tokens=2)
    run = dict(k_values=(1,), coefficients=(4.0,), methods=("add",), config=settings, progress=False)
    state = torch.get_rng_state()
    first = compare_steering(default_model_4l, sae, concept, **run).table
    assert torch.equal(torch.get_rng_state(), state)
    pd.testing.assert_frame_equal(first, compare_steering(default_model_4l, sae, concept, **run).table)


def test_loading_and_folding_an_sae_leave_the_global_rng_alone(tmp_path):
    """`load_sae` and `folded()` (which every provenance hash runs) build an SAE whose weights they
    overwrite; its initialisation must not draw from the caller's random stream."""
    from tests.conftest import make_sae

    from sae import load_sae
    from sae.files import weights_sha256

    sae = make_sae(8, 16, hook_name="blocks.0.hook_resid_pre", model_name="tiny")
    sae.save(tmp_path / "sae")
    state = torch.get_rng_state()
    loaded = load_sae(tmp_path / "sae")
    digest = weights_sha256(sae)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(loaded.W_enc, sae.W_enc) and digest == weights_sha256(loaded)


def test_loading_a_release_leaves_the_global_rng_alone():
    """`load_release` converts the shipped float16 weights into a fresh float32 SAE."""
    from sae import list_releases, load_release

    release, ids = next(iter(list_releases().items()))
    state = torch.get_rng_state()
    sae = load_release(release, ids[0])
    assert torch.equal(torch.get_rng_state(), state) and sae.W_enc.dtype == torch.float32


@pytest.mark.default_model
def test_generating_the_corpus_leaves_the_global_rng_alone(tmp_path):
    """Hugging Face's `generate` takes no generator: the corpus seeds torch inside a forked RNG, so
    the caller's state is restored and the same config still writes the same texts."""
    from training.data.generated import CorpusConfig, build_corpus

    config = CorpusConfig(n_prompts=1, samples_per_prompt=2, max_new_tokens=3, batch_size=2)
    state = torch.get_rng_state()
    build_corpus(config, tmp_path / "a.jsonl")
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(99)  # another caller state: the corpus does not depend on it
    build_corpus(config, tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
