"""Patching metrics: M(logits) -> one value per batch row.

A metric reads the logits at one position (`readout`, an int, negative from the end) or at
every position (`readout = None`). Sweeps compute the final norm and unembedding only at the
readout position, so a metric that declares one is cheaper; a metric with `columns()` (the token
ids it reads) has only those logits computed, the rest NaN. Metrics receive `pair`, the index
of the prompt pair each row belongs to, so per-pair answer tokens work in mixed batches.

A metric that needs something from the unpatched runs (KL needs the clean distribution) has a
`bind(runs)` method: the sweep calls it once with the `ReferenceRuns` and uses the metric it
returns. Adding such a metric touches no engine code, for example the log-probability of the
clean run's own top token:

```python
from dataclasses import dataclass

import torch

from patching.sweep import ReferenceRuns


@dataclass(frozen=True)
class CleanTopLogProb:
    readout: int = -1
    top: torch.Tensor | None = None  # per pair: the clean run's top token, set by bind

    def bind(self, runs: ReferenceRuns) -> "CleanTopLogProb":
        return CleanTopLogProb(self.readout, runs.clean_logits.argmax(-1))

    def __call__(self, logits, pair):
        return logits.float().log_softmax(-1)[torch.arange(logits.shape[0]), self.top.to(logits.device)[pair]]
```
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from patching.errors import PatchingError


@runtime_checkable
class Metric(Protocol):
    readout: int | None

    def __call__(self, logits: Tensor, pair: Int[Tensor, " rows"]) -> Float[Tensor, " rows"]: ...


class ReferenceRuns(NamedTuple):
    """What a metric's `bind` may read from a sweep's unpatched runs, one row per prompt pair."""

    clean_logits: Tensor
    """Logits of each pair's clean run at the metric's readout position, (pairs, vocab) (all
    positions, (pairs, pos, vocab), for a metric reading every position)."""
    corrupted_logits: Tensor
    """The same for each pair's corrupted run."""


@runtime_checkable
class BindsToRuns(Protocol):
    """A metric that needs the unpatched runs: `bind` returns the metric the sweep evaluates."""

    def bind(self, runs: ReferenceRuns) -> Metric: ...


def bind_metric(metric: Metric, runs: ReferenceRuns) -> Metric:
    """`metric.bind(runs)` for a metric that has it (`BindsToRuns`), else the metric itself."""
    return metric.bind(runs) if isinstance(metric, BindsToRuns) else metric


def _tokens(name: str, value: int | Sequence[int] | Tensor) -> Tensor:
    tokens = torch.as_tensor(value if not isinstance(value, int) else [value])
    if tokens.dtype not in (torch.int64, torch.int32) or tokens.dim() != 1 or tokens.numel() == 0:
        raise PatchingError(f"{name} must be a token id or a 1-D sequence of token ids (one per pair), got {value!r}")
    return tokens.long()


def _per_pair(tokens: Tensor, pair: Tensor) -> Tensor:
    return tokens.to(pair.device)[pair] if tokens.numel() > 1 else tokens.to(pair.device).expand(pair.shape[0])


@dataclass(frozen=True)
class LogitDiff:
    """`logit[answer] - logit[wrong]` at `position`; token ids given once or one per pair."""

    answer: int | Sequence[int] | Tensor
    """Token id(s) of the behaviour's answer (e.g. " Paris")."""
    wrong: int | Sequence[int] | Tensor
    """Token id(s) of the competing answer (e.g. " Rome")."""
    position: int = -1
    """Position whose logits are read."""

    @property
    def readout(self) -> int:
        return self.position

    def __call__(self, logits: Float[Tensor, "rows vocab"], pair: Int[Tensor, " rows"]) -> Float[Tensor, " rows"]:
        a, w = _per_pair(_tokens("answer", self.answer), pair), _per_pair(_tokens("wrong", self.wrong), pair)
        rows = torch.arange(logits.shape[0], device=logits.device)
        return (logits[rows, a] - logits[rows, w]).float()

    def token_ids(self) -> list[Tensor]:
        return [_tokens("answer", self.answer), _tokens("wrong", self.wrong)]

    def columns(self) -> Tensor:
        """The only logits this metric reads: sweeps unembed just these (docs/benchmarks.md; the head
        sweeps measured with the full unembedding are in CHANGELOG.md)."""
        return torch.unique(torch.cat(self.token_ids()))


@dataclass(frozen=True)
class TokenLogProb:
    """Log-probability of `token` at `position`."""

    token: int | Sequence[int] | Tensor
    """Token id(s), once or one per pair."""
    position: int = -1
    """Position whose logits are read."""

    @property
    def readout(self) -> int:
        return self.position

    def __call__(self, logits: Float[Tensor, "rows vocab"], pair: Int[Tensor, " rows"]) -> Float[Tensor, " rows"]:
        t = _per_pair(_tokens("token", self.token), pair)
        return logits.float().log_softmax(-1)[torch.arange(logits.shape[0], device=logits.device), t]

    def token_ids(self) -> list[Tensor]:
        return [_tokens("token", self.token)]


@dataclass(frozen=True)
class TokenProb(TokenLogProb):
    """Probability of `token` at `position`."""

    def __call__(self, logits: Float[Tensor, "rows vocab"], pair: Int[Tensor, " rows"]) -> Float[Tensor, " rows"]:
        return super().__call__(logits, pair).exp()


@dataclass(frozen=True)
class KLFromClean:
    """KL(clean || patched) of the next-token distribution at `position`, in nats.

    The sweep calls `bind(runs)` with each pair's reference runs (`ReferenceRuns`; the clean
    logits alone are accepted too); M_clean is then 0 and effects normalise as for any other metric.
    """

    position: int = -1
    """Position whose logits are read."""
    clean_log_probs: Tensor | None = field(default=None, repr=False, compare=False)
    """Per-pair clean log-probabilities, set by `bind`."""

    @property
    def readout(self) -> int:
        return self.position

    def bind(self, runs: ReferenceRuns | Float[Tensor, "pairs vocab"]) -> "KLFromClean":
        clean_logits = runs.clean_logits if isinstance(runs, ReferenceRuns) else runs
        return KLFromClean(self.position, clean_logits.float().log_softmax(-1))

    def __call__(self, logits: Float[Tensor, "rows vocab"], pair: Int[Tensor, " rows"]) -> Float[Tensor, " rows"]:
        if self.clean_log_probs is None:
            raise PatchingError("KLFromClean needs the clean logits: the sweep binds them; call bind() yourself otherwise")
        log_p = self.clean_log_probs.to(logits.device)[pair]
        return (log_p.exp() * (log_p - logits.float().log_softmax(-1))).sum(-1)


@dataclass(frozen=True)
class CallableMetric:
    """Any callable on logits returning one value per row, optionally taking `pair`.

    With `readout=None` the function sees every position, `(rows, pos, vocab)`; with an int it
    sees that position only, `(rows, vocab)` — cheaper, and what attribution needs.
    """

    fn: Callable[..., Tensor]
    """The user's function."""
    readout: int | None = None
    """Position the function reads, or None for all."""

    def __call__(self, logits: Tensor, pair: Int[Tensor, " rows"]) -> Float[Tensor, " rows"]:
        takes_pair = len(inspect.signature(self.fn).parameters) >= 2
        out = self.fn(logits, pair) if takes_pair else self.fn(logits)
        if not isinstance(out, Tensor) or out.shape != (logits.shape[0],):
            raise PatchingError(
                f"metric {getattr(self.fn, '__name__', self.fn)!r} must return one value per batch row, "
                f"shape ({logits.shape[0]},); got {getattr(out, 'shape', type(out).__name__)}"
            )
        return out.float()

    def __repr__(self) -> str:
        return f"CallableMetric({getattr(self.fn, '__qualname__', repr(self.fn))})"


def as_metric(metric: Any) -> Metric:
    """A metric object (callable with a `readout`) as it is; a plain callable wrapped; else refused."""
    if isinstance(metric, Metric):
        return metric
    if callable(metric):
        return CallableMetric(metric)
    raise PatchingError(f"metric must be a callable on logits or a latentpatch metric, got {type(metric).__name__}")


def describe(metric: Metric) -> str:
    """A stable text description for result manifests."""
    return repr(metric)
