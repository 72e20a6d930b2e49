"""Shared fixtures: tiny random models for invariants, the default model for integration.

Models are built inside fixtures (never at import time) and shared per module or session.
"""

from __future__ import annotations

import dataclasses
import inspect
import os

import pytest
import torch

from patching.model import tl_compat
from sae import SAEConfig, SparseAutoencoder


MODEL_FIXTURES = {"default_model": "default_model", "default_model_4l": "default_model", "gemma": "gemma3"}
"""Fixtures that load a real model (test_gemma3.py defines `gemma`), and the marker a test using one carries."""


BACKEND = os.environ.get("LATENTPATCH_TEST_BACKEND", "hooked")
"""The backend the model fixtures boot: "hooked" (make test) or "bridge" (make test-bridge, on
TransformerLens 4): `tiny_model`, `default_model` and `default_model_4l` are then TransformerBridges
of the same shapes, and tests marked `hooked_only` are skipped with their reason."""


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Mark every test that uses a model fixture, directly or through another fixture (`fixturenames`
    is the closure), so `-m "not default_model"` never loads the default model whatever a test's
    author remembered to mark. On the bridge backend, skip what is marked `hooked_only`."""
    for item in items:
        for name in sorted(set(item.fixturenames) & MODEL_FIXTURES.keys()):
            item.add_marker(MODEL_FIXTURES[name])
        marker = item.get_closest_marker("hooked_only")
        if BACKEND == "bridge" and marker is not None:
            item.add_marker(pytest.mark.skip(reason=f"hooked backend only: {marker.kwargs.get('reason', marker.args)}"))


def construct_unchecked(cls, **values):
    """Build a frozen dataclass without its generated __init__, then run its __post_init__.

    The test run type-checks every call (jaxtyping + beartype), which would refuse a value of
    the wrong type before our own validation runs; users without a checker meet our check.
    """
    fields = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    fields.update({f.name: f.default_factory() for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING})
    fields.update(values)
    obj = object.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(obj, name, value)
    obj.__post_init__()
    return obj


def unchecked(fn):
    """`fn` without the test run's type-checking wrapper, to reach our own validation."""
    return inspect.unwrap(fn)


def make_sae(d_in: int, d_sae: int, *, hook_name: str | None, model_name: str | None, seed: int = 0,
             architecture: str = "standard", k: int | None = None, **kwargs) -> SparseAutoencoder:
    """A random SAE with non-trivial biases, so that tests exercise every term."""
    gen = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, hook_name=hook_name, model_name=model_name,
                    architecture=architecture, k=k, **kwargs)
    sae = SparseAutoencoder(cfg, generator=gen)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(d_sae, generator=gen) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in, generator=gen) * 0.1)
        sae.W_enc.mul_(1 + torch.rand(d_in, d_sae, generator=gen))
        if architecture == "jumprelu":
            sae.threshold.copy_(torch.rand(d_sae, generator=gen) * 0.2)
    return sae


def edited_pair(seed: int, rows: int, length: int, edits, vocab: int = 50):
    """Random clean token rows and a corrupted copy for the path and edge tests: each (row, position,
    shift) in `edits` adds `shift` (mod `vocab`) to that token; row None edits every row."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (rows, length), generator=g)
    corrupted = clean.clone()
    for row, position, shift in edits:
        index = slice(None) if row is None else row
        corrupted[index, position] = (corrupted[index, position] + shift) % vocab
    return clean, corrupted


def affine_attention_model(n_layers: int):
    """An attention-only random model whose attention patterns cannot change (zero queries: uniform
    causal attention), so the residual stream is affine in the embeddings: the toy on which the
    edge estimators are exact. The unembedding is scaled so that effects are not tiny."""
    model = tl_compat.random_model(n_layers=n_layers, d_vocab=50, n_ctx=32, attn_only=True, normalization_type=None,
                                   d_mlp=None, seed=3).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.W_Q.zero_()
            block.attn.b_Q.zero_()
        model.unembed.W_U.mul_(30)
    return model


def planted_heads_model():
    """Attention only, no norms, zero queries (so only values and direct paths matter). Heads L0H1
    and L1H2 write strongly; every other head writes a thousandth as much (the noise): the circuit
    tests' planted toy."""
    model = tl_compat.random_model(n_layers=2, d_vocab=50, n_ctx=32, attn_only=True, normalization_type=None,
                                   d_mlp=None, seed=4).eval()
    with torch.no_grad():
        for layer, block in enumerate(model.blocks):
            block.attn.W_Q.zero_()
            block.attn.b_Q.zero_()
            keep = {0: 1, 1: 2}[layer]
            scale = torch.full((4, 1, 1), 1e-3)
            scale[keep] = 4.0
            block.attn.W_O.mul_(scale)
        model.unembed.W_U.mul_(30)
    return model


def saes_at(model, sites, d_sae: int = 10) -> dict:
    """A seeded random SAE of `d_sae` latents at each of `sites` (seed = the site's index), keyed by site:
    the two-site SAE sets the path, mixed-circuit and mixed-edge tests share."""
    return {site: make_sae(model.cfg.d_model, d_sae, hook_name=site.hook_name, model_name=model.cfg.model_name, seed=seed)
            for seed, site in enumerate(sites)}


def learned_or_rotary_gqa(kind: str):
    """The two 3-layer random models the head, path and edge tests run on: learned positions, or rotary
    positions with RMS norm, grouped-query attention (2 key/value heads) and a gated SiLU MLP."""
    from patching.model import tl_compat

    if kind == "learned":
        model = tl_compat.random_model(n_layers=3, d_vocab=50, n_ctx=32)
    else:
        model = tl_compat.random_model(n_layers=3, d_vocab=50, n_ctx=32, positional_embedding_type="rotary",
                                       rotary_dim=4, normalization_type="RMS", n_key_value_heads=2,
                                       act_fn="silu", gated_mlp=True, seed=1)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    if BACKEND == "bridge":
        from tests.test_bridge import tiny_gpt2_bridge

        return tiny_gpt2_bridge(tmp_path_factory.mktemp("tiny-gpt2"))
    model = tl_compat.random_model(n_layers=3, d_vocab=50, n_ctx=32)
    model.eval()
    return model


@pytest.fixture(scope="module")
def tiny_sae(tiny_model):
    return make_sae(tiny_model.cfg.d_model, 48, hook_name="blocks.1.hook_resid_pre",
                    model_name=tiny_model.cfg.model_name)


@pytest.fixture(scope="module")
def tiny_tokens():
    return torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def default_model():
    from patching import load_model

    return load_model(backend=BACKEND)


@pytest.fixture(scope="session")
def default_model_4l():
    from patching import load_model

    return load_model(n_layers=4, backend=BACKEND)


def stub_model_loader(monkeypatch, load):
    """Replace the one model loader every command reaches and return the list of its calls.

    `patching.model.loading.load_model` is where the CLI looks it up (at call time, through
    `load_model_for` and `load_plain_model`); patching `patching.load_model` instead reaches no
    command. A test asserts the list is non-empty, so a stub that never takes effect fails."""
    import patching.model.loading

    calls = []

    def stub(*args, **kwargs):
        calls.append((args, kwargs))
        return load(*args, **kwargs)

    monkeypatch.setattr(patching.model.loading, "load_model", stub)
    return calls
