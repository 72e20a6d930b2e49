"""Snapshot every hook, flag and mode of a model, to prove a call left it as it found it."""

from __future__ import annotations

import torch

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def snapshot(model: torch.nn.Module) -> dict:
    state = {}
    for name, module in model.named_modules():
        hooks = tuple((attr, tuple(getattr(module, attr, {}).keys())) for attr in HOOK_DICTS)
        tl_lists = tuple(len(getattr(module, attr, ())) for attr in ("fwd_hooks", "bwd_hooks"))
        state[name] = (hooks, tl_lists, module.training, len(getattr(module, "ctx", {}) or {}))
    state["<grad>"] = tuple(p.requires_grad for p in model.parameters())
    return state


class CountingHook:
    """Counts calls into the model: the embedding and every block, so that a run starting mid-model
    from cached residuals (the sweep engine's and the causal trace's joining rows) counts too.
    Zero means no forward work was done."""

    def __init__(self, model) -> None:
        self.count = 0
        modules = [model.embed, *getattr(model, "blocks", [])]
        self.handles = [module.register_forward_hook(self._hook) for module in modules]

    def _hook(self, *args) -> None:
        self.count += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def assert_refused_before_any_forward(model, call, error, pattern) -> None:
    """`call()` raises `error` matching `pattern` with zero forward passes and leaves the model as it was."""
    import pytest

    before = snapshot(model)
    counter = CountingHook(model)
    try:
        with pytest.raises(error, match=pattern):
            call()
        forwards = counter.count
    finally:
        counter.remove()
    assert forwards == 0
    assert snapshot(model) == before


def assert_splice_identity(model, sae, tokens) -> None:
    """Spliced with the error term the logits are bit-identical; without it they differ (the SAE is
    in the path: the error term is what restores it)."""
    from patching import splice

    with torch.inference_mode():
        reference = model(tokens)
        with splice(model, sae, error_term=True):
            spliced = model(tokens)
        with splice(model, sae, error_term=False):
            without_error = model(tokens)
    assert torch.equal(spliced, reference)
    assert not torch.equal(without_error, reference)
