"""Reading refusals: the refusal score at the first assistant position, greedy refusal rates,
and the chat formatting they are read on, each batched over prompts of equal length."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from patching.errors import PatchingError
from patching.model import tl_compat
from patching.safety.prompts import COMPLIANCE_START, REFUSAL_START, SafetySuite, is_refusal
from patching.splice.generate import Decoder, Interventions, SharedPrefix, generate_by_length, intervening, prompt_batches


@dataclass(frozen=True)
class RefusalScore:
    """logsumexp of refusal-start logits minus logsumexp of compliance-start logits at `position`."""

    refusal: tuple[int, ...]
    """Token ids that start a refusal (e.g. "I" of "I'm sorry")."""
    compliance: tuple[int, ...]
    """Token ids that start compliance (e.g. "Sure")."""
    position: int = -1
    """Position read: the first assistant position by default (the prompt's last token)."""

    @property
    def readout(self) -> int:
        return self.position

    @classmethod
    def for_model(cls, model: Any) -> "RefusalScore":
        ids = {text: tl_compat.single_token_id(model, text) for text in (REFUSAL_START, COMPLIANCE_START)}
        if None in ids.values():
            raise PatchingError(f"RefusalScore.for_model needs {REFUSAL_START!r} and {COMPLIANCE_START!r} to be single "
                                f"tokens of this model's tokenizer; build RefusalScore(refusal=..., compliance=...) from ids")
        return cls((ids[REFUSAL_START],), (ids[COMPLIANCE_START],))

    def token_ids(self) -> list[Tensor]:
        return [torch.tensor(self.refusal), torch.tensor(self.compliance)]

    def __call__(self, logits: Float[Tensor, "rows vocab"], pair: Int[Tensor, " rows"]) -> Float[Tensor, " rows"]:
        logits = logits.float()
        return logits[:, list(self.refusal)].logsumexp(-1) - logits[:, list(self.compliance)].logsumexp(-1)


def tokenize_chat(model: Any, suite: SafetySuite, requests: Sequence[str]) -> list[Tensor]:
    """Chat-formatted prompts as (1, pos) token rows; the template supplies the BOS itself."""
    tokenizer = tl_compat.tokenizer(model)
    return [tl_compat.to_tokens(model, suite.format(tokenizer, request), prepend_bos=False) for request in requests]


def query_start(model: Any, suite: SafetySuite) -> int:
    """First position where two chat-formatted requests differ: where the shared context ends."""
    a, b = tokenize_chat(model, suite, ["Hello there.", "Goodbye now!"])
    n = min(a.shape[1], b.shape[1])
    differ = torch.nonzero(a[0, :n] != b[0, :n]).flatten()
    return int(differ[0]) if differ.numel() else n


InterventionsFor = Callable[[list[int]], Interventions]
"""Builds the interventions of one batch from the indices of its prompts."""


def refusal_scores(model: Any, prompts: Sequence[Tensor], metric: RefusalScore,
                   interventions: InterventionsFor | None = None, prefix: SharedPrefix | None = None,
                   pad: bool = False) -> Tensor:
    """The refusal score of each `(1, pos)` prompt, `(prompts,)`; equal lengths run as one batch,
    after the `prefix` they share (if given: run once, not intervened on); with `pad`, every prompt
    in one batch (`prompt_batches`: only for interventions that do not pick positions)."""
    out = torch.zeros(len(prompts))
    for indices, batch, mask in prompt_batches(prompts, prefix, pad and metric.readout == -1):
        spec = interventions(indices) if interventions is not None else Interventions()
        with torch.inference_mode(), intervening(model, spec):
            if metric.readout == -1:
                logits = Decoder(model, batch, prefix=prefix, attention_mask=mask).forward()
            else:
                logits = tl_compat.forward_logits(model, batch)[:, metric.readout]
        out[indices] = metric(logits, torch.zeros(len(indices), dtype=torch.long)).cpu()
    return out


def greedy_texts(model: Any, prompts: Sequence[Tensor], max_new_tokens: int,
                 interventions: InterventionsFor | None = None, prefix: SharedPrefix | None = None,
                 pad: bool = False) -> list[str]:
    """Greedy continuations (KV-cached, equal lengths batched; `pad`: all in one batch, see
    `prompt_batches`), decoded up to end of sequence."""
    rows = generate_by_length(model, prompts, max_new_tokens, interventions, prefix=prefix, pad=pad)
    return [decode_until_eos(model, row) for row in rows]


def greedy_scored(model: Any, prompts: Sequence[Tensor], max_new_tokens: int, metric: RefusalScore,
                  interventions: InterventionsFor | None = None, prefix: SharedPrefix | None = None,
                  pad: bool = False) -> tuple[list[str], Tensor]:
    """`greedy_texts` and `refusal_scores` from one pass: the score reads the last prompt token's
    logits, which are the first decoding step's (equal to the separate calls; tested)."""
    if metric.readout != -1:
        raise PatchingError(f"greedy_scored needs a metric read at the last prompt token (readout -1), got {metric.readout}")
    scores = torch.zeros(len(prompts))

    def score(indices: list[int], logits: Tensor) -> None:
        scores[indices] = metric(logits, torch.zeros(len(indices), dtype=torch.long)).cpu()

    rows = generate_by_length(model, prompts, max_new_tokens, interventions, prefix=prefix, pad=pad, first_logits=score)
    return [decode_until_eos(model, row) for row in rows], scores


def decode_until_eos(model: Any, tokens: Tensor) -> str:
    """The text of generated token ids, cut at the first end-of-sequence token."""
    eos = getattr(tl_compat.tokenizer(model), "eos_token_id", None)
    ids = tokens.tolist()
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tl_compat.to_string(model, torch.tensor(ids, dtype=torch.long))


def refusal_rate(generations: Sequence[str]) -> float:
    return sum(map(is_refusal, generations)) / max(1, len(generations))
