"""Inputs longer than the model's context are refused before any forward pass (issue 30, item 1).

TransformerLens's `to_tokens` cuts a text to its first `n_ctx` tokens without a word, so a patch on
two long prompts was computed on their beginnings, with the metric read after the wrong token.
Every entry point now refuses, naming the lengths; the cut happens only when asked for. The model
here is a tiny random one with a word-level tokenizer (`worded_model`), so texts of any token
length are easy to write.
"""

from __future__ import annotations

import pytest
import torch

from hooks_snapshot import assert_refused_before_any_forward
from patching import LogitDiff, PatchingError, attribute_latents, generate_steered, padded_tokens, patch_latents
from patching.model import tl_compat
from patching.splice.generate import generate
from patching.tracing import NoiseConfig, causal_trace, self_repair
from conftest import make_sae
from worded_model import worded_model

N_CTX = 16


@pytest.fixture(scope="module")
def worded(tmp_path_factory):
    return worded_model(tmp_path_factory.mktemp("tokenizer"), n_ctx=N_CTX)


@pytest.fixture(scope="module")
def sae(worded):
    return make_sae(worded.cfg.d_model, 24, hook_name="blocks.1.hook_resid_pre", model_name=worded.cfg.model_name)


def text(n_words: int, last: str = "w1") -> str:
    """A text of `n_words` words (one token each; BOS makes it one more)."""
    return " ".join(["w5"] * (n_words - 1) + [last])


def test_to_tokens_refuses_a_long_text_and_cuts_only_when_asked(worded):
    assert tl_compat.to_tokens(worded, text(N_CTX - 1)).shape == (1, N_CTX)  # BOS + 15 words: exactly fits
    with pytest.raises(PatchingError, match=rf"17 tokens but the model's context holds {N_CTX}"):
        tl_compat.to_tokens(worded, text(N_CTX))
    cut = tl_compat.to_tokens(worded, text(N_CTX + 4), truncate=True)
    assert torch.equal(cut, worded.to_tokens(text(N_CTX + 4)))  # TransformerLens's own cut: the first n_ctx
    assert cut.shape == (1, N_CTX)
    with pytest.raises(PatchingError, match="longest of 2 texts"):
        tl_compat.to_tokens(worded, [text(3), text(N_CTX + 1)])
    with pytest.raises(PatchingError, match="context holds"):
        padded_tokens(worded, [text(3), text(N_CTX + 1)])
    tokens, mask = padded_tokens(worded, [text(3), text(N_CTX + 1)], truncate=True)
    assert tokens.shape == (2, N_CTX) and mask.sum().item() == 4 + N_CTX


def test_patch_and_attribution_refuse_prompts_that_differ_past_the_context(worded, sae):
    # The two prompts differ only after the cut: truncated, "the metric gives the same value" would follow.
    clean, corrupted = text(N_CTX + 3, "w1"), text(N_CTX + 3, "w2")
    metric = LogitDiff(answer=7, wrong=8)
    for call in (lambda: patch_latents(worded, sae, clean, corrupted, metric, progress=False),
                 lambda: attribute_latents(worded, sae, clean, corrupted, metric, progress=False)):
        assert_refused_before_any_forward(worded, call, PatchingError, rf"{N_CTX + 4} tokens but .* holds {N_CTX}")
    long_tokens = torch.randint(0, 50, (1, N_CTX + 1), generator=torch.Generator().manual_seed(0))
    assert_refused_before_any_forward(
        worded, lambda: patch_latents(worded, sae, long_tokens, long_tokens.flip(1), metric, progress=False),
        PatchingError, rf"clean tokens is {N_CTX + 1} tokens")


def test_trace_and_self_repair_refuse_long_inputs(worded):
    noise = NoiseConfig(scale=0.1, n_samples=2)
    assert_refused_before_any_forward(worded, lambda: causal_trace(worded, text(N_CTX + 2), [1], 7, noise=noise),
                                      PatchingError, "context holds")
    long_tokens = torch.full((1, N_CTX + 1), 5)
    assert_refused_before_any_forward(worded, lambda: causal_trace(worded, long_tokens, [1], 7, noise=noise),
                                      PatchingError, "context holds")
    assert_refused_before_any_forward(worded, lambda: self_repair(worded, long_tokens, LogitDiff(7, 8)),
                                      PatchingError, rf"{N_CTX + 1} tokens but")


def test_generation_refuses_prompt_plus_new_tokens_past_the_context(worded, sae):
    prompt = tl_compat.to_tokens(worded, text(9))  # 10 tokens: 6 more fit, 7 do not
    assert generate(worded, prompt, N_CTX - 10).shape == (1, N_CTX)
    assert_refused_before_any_forward(worded, lambda: generate(worded, prompt, N_CTX - 9), PatchingError,
                                      rf"10 tokens\) plus max_new_tokens=7 .* holds {N_CTX}")
    assert_refused_before_any_forward(worded, lambda: tl_compat.generate(worded, text(9), max_new_tokens=7),
                                      PatchingError, "plus max_new_tokens=7")
    assert_refused_before_any_forward(worded, lambda: tl_compat.generate(worded, prompt, max_new_tokens=100000),
                                      PatchingError, "plus max_new_tokens=100000")
    assert_refused_before_any_forward(
        worded, lambda: generate_steered(worded, sae, [3], text(9), coefficient=2.0, max_new_tokens=100000),
        PatchingError, "plus max_new_tokens=100000")
    assert_refused_before_any_forward(
        worded, lambda: generate_steered(worded, sae, [3], [text(2), text(N_CTX + 5)], coefficient=2.0, max_new_tokens=1),
        PatchingError, "context holds")


def test_a_bound_prefix_counts_towards_the_context(worded):
    prefix = tl_compat.to_tokens(worded, text(9))
    with tl_compat.bound_prefix(worded, prefix):
        worded(torch.full((1, N_CTX - 10), 5))  # 10 + 6 positions: fits
        assert_refused_before_any_forward(worded, lambda: worded(torch.full((1, N_CTX - 9), 5)), PatchingError,
                                          "bound prefix and cache \\(10 positions\\) of 7 more")
