"""How well an SAE stands in for its site on one batch of tokens: the per-batch form of the one
evaluator, `patching.splice.evaluation.evaluate_sae` (SAEBench's core figures under SAELens's
names and definitions; the formulas live in `sae.metrics`, each with a closed-form test).

Scored tokens are the evaluator's: the real tokens of the batch (`mask`, for right-padded rows)
whose ids are not the tokenizer's BOS, EOS, PAD, SEP or decoder-start ids (SAELens's
`get_special_token_ids`; `ignore_tokens` overrides them). With right padding the logits at real
positions do not depend on the padding (attention is causal), so masking is exact.

Before the one evaluator this module had its own figures (`SpliceMetrics`: `ce_loss_recovered`,
`ce_clean`, `kl_spliced`, ..., with position 0 left out instead of the special ids); those names
still read on the result, with a DeprecationWarning, for one release (`sae.metrics.LEGACY_FIGURE_NAMES`).
"""

from __future__ import annotations

import warnings
from typing import Any

from jaxtyping import Bool, Int
from torch import Tensor

from patching.model.sites import Site
from patching.model.tokens import padded_tokens  # noqa: F401  (re-exported: quality's callers pad with it)
from patching.splice.evaluation import EvalConfig, SAEEvaluation, check_right_padding, evaluate_sae
from patching.splice.splicer import SpliceChecks
from sae.metrics import ce_loss_recovered, cross_entropy, explained_variance, kl_divergence, l0, mse

__all__ = ["SpliceMetrics", "ce_loss_recovered", "cross_entropy", "explained_variance", "kl_divergence", "l0", "mse",
           "padded_tokens", "splice_metrics"]

SpliceMetrics = SAEEvaluation
"""Deprecated name of `SAEEvaluation` (what `splice_metrics` returns); its old field names still
read, with a DeprecationWarning."""


def splice_metrics(model: Any, sae: Any, tokens: Int[Tensor, "batch pos"], *, mask: Bool[Tensor, "batch pos"] | None = None,
                   site: Site | None = None, ignore_tokens: tuple[int, ...] | None = None,
                   checks: SpliceChecks | None = None, exclude_first_position: bool | None = None) -> SAEEvaluation:
    """`evaluate_sae` on one batch of `tokens` (one forward pass of each kind over all rows).

    `mask` marks the real tokens of a right-padded batch (`padded_tokens` gives both); padding is
    left out of every figure. `ignore_tokens` as `EvalConfig.ignore_tokens` (None: the
    tokenizer's special ids; (): score every real token). `exclude_first_position` is deprecated
    (position 0 was left out of the reconstruction figures before the one evaluator): True now means
    the default (the special ids, BOS among them), False `ignore_tokens=()`.
    """
    if exclude_first_position is not None:
        warnings.warn("splice_metrics(exclude_first_position=...) is deprecated and will be removed in the next "
                      "release; use ignore_tokens= (the tokenizer's special ids by default, () for none)",
                      DeprecationWarning, stacklevel=2)
        if ignore_tokens is None and not exclude_first_position:
            ignore_tokens = ()
    check_right_padding(tokens, mask)
    config = EvalConfig(batch_size=max(1, tokens.shape[0]), context_size=max(2, tokens.shape[-1]),
                        ignore_tokens=ignore_tokens, progress=False)
    return evaluate_sae(model, sae, tokens, site=site, config=config, checks=checks, mask=mask)
