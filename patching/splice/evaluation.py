"""The project's one evaluator of an SAE at its site: SAEBench's core figures, streamed over many
texts or token rows. The trainer's eval line, `latentpatch eval`, the demo and the release registry
all print `SAEEvaluation.figures()` (under SAELens's names); `splice_metrics` is its per-batch form.
Which tokens are read and scored: `patching.splice.scored_tokens`.

The figures and their definitions follow SAELens 6.54 `sae_lens/evals.py` (`get_recons_loss`,
`get_downstream_reconstruction_metrics`, `get_sparsity_and_variance_metrics`,
`ExplainedVarianceCalculator`), which SAEBench's core evaluation calls; a test recomputes them with
SAELens's own functions on the same tokens (tests/test_evaluation.py). What we matched:

- Ignored tokens: by token id, SAELens's `get_special_token_ids` (BOS, EOS, PAD, SEP and
  decoder-start ids; not chat-template tokens). At an ignored position the spliced run keeps the
  original activation (`torch.where(mask, sae_out, x)`), the zero-ablated run zeroes every
  position, the next-token loss predicted *from* it and its KL are dropped, and it is left out of
  every reconstruction statistic and every latent's firing count.
- `ce_loss_score = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)`;
  `kl_div_score = (KL_ablated - KL_spliced) / KL_ablated`, KL(clean || run) per position, in nats.
  Means are over all kept positions of all batches.
- `explained_variance = 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2)`: about the mean, accumulated
  in float64 across batches (SAELens's `ExplainedVarianceCalculator`; `sae.metrics.explained_variance`
  on one tensor).
- `mse_per_token = E||x - x_hat||^2` (SAELens's "mse": sum over d_in, mean over tokens); `mse` is
  the project's per-element figure (`sae.metrics.mse`), `mse_per_token / d_in`.
- `cossim = E cos(x, x_hat)`; `l0 = E #{z != 0}`; `l1 = E sum |z|`; `l2_ratio = E ||x_hat|| / ||x||`
  (a norm under 1e-4 divides by 1, as SAELens); `relative_reconstruction_bias = E||x_hat||^2 /
  E<x, x_hat>` (Gao et al. 2024 eq. 10) over all tokens (SAELens averages per-batch ratios; the two
  agree for one batch).
- Feature density = firing count / kept tokens, per latent (SAELens's `feature_density`).

Beyond SAELens: `explained_variance_typical`, the same figure over the tokens that are not massive
activations (norm over `massive_norm_ratio` x the batch's median; Sun et al. 2024). At SmolLM2-135M's
layer 15 about one real-text token in 3,000 has a norm 100x the median, and those tokens carry most
of the variance, so the SAEBench figure measures how well an SAE reconstructs them.

SAEBench's "misc" figures: dead fraction (never fired on the evaluated tokens),
dense fraction (fired on more than `dense_threshold` of them, default 10%, SAEBench's
`freq_over_10_percent`), and per latent the largest |cosine| between its decoder row and any other
latent's, summarised by mean, true median and quantiles (plus SAEBench's signed-max mean).

Padding of unequal texts never counts (right padding, see `patching.model.tokens`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from patching.model import tl_compat
from patching.model.sites import Site
from patching.splice.collect import resolve_site
from patching.splice.eval_runs import batch_runs, starts_at_block
from patching.splice.decoder_cosine import COSINE_QUANTILES, cosine_summary, max_decoder_cosine
from patching.splice.scored_tokens import check_right_padding, ignored_token_ids, token_batches
from patching.splice.splicer import SpliceChecks
from sae.metrics import (
    LEGACY_FIGURE_NAMES,
    MASSIVE_NORM_RATIO,
    ce_loss_recovered,
    cross_entropy,
    explained_variance_from_sums,
    kl_div_score,
    kl_divergence,
    massive,
    warn_legacy_name,
)

__all__ = ["COSINE_QUANTILES", "EvalConfig", "FIGURE_NAMES", "SAEEvaluation", "check_right_padding", "cosine_summary",
           "evaluate_sae", "evaluate_saes", "explained_variance_from_sums", "ignored_token_ids", "max_decoder_cosine", "token_batches"]

FIGURE_NAMES = ("ce_loss_score", "ce_loss_with_sae", "ce_loss_without_sae", "ce_loss_with_ablation", "kl_div_score",
                "kl_div_with_sae", "kl_div_with_ablation", "explained_variance", "explained_variance_typical",
                "n_massive", "mse", "mse_per_token", "cossim", "l2_norm_in", "l2_norm_out", "l2_ratio",
                "relative_reconstruction_bias", "l0", "l1", "frac_dead", "frac_dense", "frac_over_1_percent",
                "n_tokens", "n_loss_positions", "n_texts")
"""The scalar figures of an `SAEEvaluation`, by their one name: what the trainer's eval log line
(`eval/<name>`), `latentpatch eval`, the demo and the release registry record."""


@dataclass(frozen=True)
class EvalConfig:
    """How an evaluation runs: batching, which tokens count, and the thresholds it reports."""

    batch_size: int = 8
    """Texts (or token rows) per forward pass."""
    context_size: int = 128
    """Texts are truncated to this many tokens (BOS included), as SAELens's activation store does."""
    max_tokens: int | None = None
    """Stop after the batch that brings the evaluated (kept) tokens to this many; None: the whole corpus."""
    ignore_tokens: tuple[int, ...] | None = None
    """Token ids left out of every figure; None: the tokenizer's BOS/EOS/PAD/SEP/decoder-start ids
    (SAELens's default); (): none."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of tokens counts as dense."""
    massive_norm_ratio: float = MASSIVE_NORM_RATIO
    """Tokens whose activation norm exceeds this multiple of their batch's median are massive
    activations (`sae.metrics.massive`); `explained_variance_typical` leaves them out. Every SAEBench figure keeps them."""
    cosine_chunk: int = 4096
    """Decoder rows per block of the pairwise-cosine product (memory: chunk x d_sae floats)."""
    progress: bool = True
    """Show a tqdm progress bar over batches."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "context_size", "cosine_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.context_size < 2:
            raise ValueError(f"EvalConfig.context_size must be >= 2 (one next-token target), got {self.context_size}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"EvalConfig.max_tokens must be >= 1 or None, got {self.max_tokens}")
        if not self.massive_norm_ratio > 1:
            raise ValueError(f"EvalConfig.massive_norm_ratio must be > 1, got {self.massive_norm_ratio}")
        if not 0 < self.dense_threshold < 1:
            raise ValueError(f"EvalConfig.dense_threshold must be in (0, 1), got {self.dense_threshold}")


@dataclass(frozen=True)
class SAEEvaluation:
    """SAEBench's core figures for one SAE at one site (definitions in the module docstring)."""

    site: str
    """Hook name the SAE was evaluated at."""
    ce_loss_score: float
    """(CE_ablated - CE_spliced) / (CE_ablated - CE_clean)."""
    ce_loss_with_sae: float
    """Mean next-token CE with the SAE's reconstruction in place of the site (kept positions)."""
    ce_loss_without_sae: float
    """Mean next-token CE of the unmodified model."""
    ce_loss_with_ablation: float
    """Mean next-token CE with the site zeroed at every position."""
    kl_div_score: float
    """(KL_ablated - KL_spliced) / KL_ablated."""
    kl_div_with_sae: float
    """Mean KL(clean || spliced) per kept position, nats."""
    kl_div_with_ablation: float
    """Mean KL(clean || zero-ablated) per kept position, nats."""
    explained_variance: float
    """1 - E||x - x_hat||^2 / total variance of x about its mean."""
    explained_variance_typical: float
    """The same over the tokens that are not massive activations (`EvalConfig.massive_norm_ratio`):
    a handful of massive tokens can carry most of the total variance, and then decide the figure above."""
    n_massive: int
    """Kept tokens whose norm marked them as massive activations."""
    mse: float
    """Mean squared error per element."""
    mse_per_token: float
    """E||x - x_hat||^2 (SAELens's "mse")."""
    cossim: float
    """Mean cosine similarity of x and x_hat."""
    l2_norm_in: float
    """Mean ||x||."""
    l2_norm_out: float
    """Mean ||x_hat||."""
    l2_ratio: float
    """Mean ||x_hat|| / ||x|| (relative reconstruction norm)."""
    relative_reconstruction_bias: float
    """E||x_hat||^2 / E<x, x_hat>; 1 means no shrinkage."""
    l0: float
    """Mean number of non-zero latents per token."""
    l1: float
    """Mean sum of |latent| per token."""
    frac_dead: float
    """Fraction of latents that never fired on the evaluated tokens."""
    frac_dense: float
    """Fraction of latents firing on more than `dense_threshold` of the tokens."""
    frac_over_1_percent: float
    """Fraction of latents firing on more than 1% of the tokens (SAEBench's freq_over_1_percent)."""
    dense_threshold: float
    """The threshold `frac_dense` used."""
    decoder_cosine: dict[str, float]
    """Max |cos| of each decoder row with any other row: mean, median, min, max and quantiles; and
    SAEBench's `average_max_decoder_cosine_sim` (mean of the signed max)."""
    n_tokens: int
    """Kept tokens the reconstruction statistics and densities were measured on."""
    n_loss_positions: int
    """Next-token predictions the CE figures averaged."""
    n_texts: int
    """Texts (or token rows) read."""
    feature_density: Tensor = field(repr=False)
    """Per latent: fraction of kept tokens on which it fired, (d_sae,)."""
    max_decoder_cosine: Tensor = field(repr=False)
    """Per latent: max |cos| with any other decoder row, (d_sae,)."""

    def figures(self) -> dict[str, float | int]:
        """The scalar figures, flat, under `FIGURE_NAMES` (SAELens's names)."""
        return {name: getattr(self, name) for name in FIGURE_NAMES}

    def __getattr__(self, name: str) -> Any:
        """Names used before the one evaluator (`sae.metrics.LEGACY_FIGURE_NAMES`, e.g.
        `ce_loss_recovered`), readable for one release with a DeprecationWarning."""
        if name not in LEGACY_FIGURE_NAMES:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self, warn_legacy_name(type(self).__name__, name))

    def to_dict(self) -> dict[str, Any]:
        """The figures grouped as SAEBench's core output is, without the per-latent arrays."""
        return {
            "site": self.site,
            "model_behavior_preservation": {k: getattr(self, k) for k in
                                            ("kl_div_score", "kl_div_with_sae", "kl_div_with_ablation")},
            "model_performance_preservation": {k: getattr(self, k) for k in ("ce_loss_score", "ce_loss_with_sae",
                                               "ce_loss_without_sae", "ce_loss_with_ablation")},
            "reconstruction_quality": {k: getattr(self, k) for k in
                                       ("explained_variance", "explained_variance_typical", "mse",
                                        "mse_per_token", "cossim")},
            "shrinkage": {k: getattr(self, k) for k in
                          ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias")},
            "sparsity": {"l0": self.l0, "l1": self.l1, "frac_dead": self.frac_dead, "frac_dense": self.frac_dense,
                         "frac_over_1_percent": self.frac_over_1_percent, "dense_threshold": self.dense_threshold},
            "decoder_cosine": dict(self.decoder_cosine),
            "token_stats": {"n_tokens": self.n_tokens, "n_loss_positions": self.n_loss_positions,
                            "n_texts": self.n_texts, "n_massive": self.n_massive},
        }


@dataclass
class _Sums:
    """Running sums over batches (float64 on the CPU: the total variance is a difference of two
    large, nearly equal numbers when x has a large mean)."""

    d_in: int
    d_sae: int
    massive_norm_ratio: float = MASSIVE_NORM_RATIO
    n: int = 0
    n_typical: int = 0
    sum_x: Tensor = field(init=False)
    sum_x_typical: Tensor = field(init=False)
    fires: Tensor = field(init=False)
    totals: dict[str, float] = field(default_factory=dict)
    n_loss: int = 0
    n_texts: int = 0

    def __post_init__(self) -> None:
        self.sum_x = torch.zeros(self.d_in, dtype=torch.float64)
        self.sum_x_typical = torch.zeros(self.d_in, dtype=torch.float64)
        self.fires = torch.zeros(self.d_sae, dtype=torch.int64)

    def add(self, name: str, value: Tensor | float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + float(value)

    def add_tokens(self, x: Float[Tensor, "token d_in"], x_hat: Float[Tensor, "token d_in"],
                   z: Float[Tensor, "token d_sae"]) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.n += x.shape[0]
        self.sum_x += x.sum(0).cpu()
        norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        self.add("sum_sq", x.pow(2).sum())
        squared_error = (x - x_hat).pow(2).sum(-1)
        self.add("sse", squared_error.sum())
        typical = ~massive(x, self.massive_norm_ratio)
        self.n_typical += int(typical.sum())
        self.sum_x_typical += x[typical].sum(0).cpu()
        self.add("sum_sq_typical", x[typical].pow(2).sum())
        self.add("sse_typical", squared_error[typical].sum())
        self.add("cossim", ((x / norm_in[:, None]) * (x_hat / norm_out[:, None])).sum())
        self.add("l2_in", norm_in.sum())
        self.add("l2_out", norm_out.sum())
        self.add("l2_ratio", (norm_out / torch.where(norm_in.abs() < 1e-4, 1.0, norm_in)).sum())
        self.add("xhat_sq", norm_out.pow(2).sum())
        self.add("x_dot_xhat", (x * x_hat).sum())
        active = z != 0  # != rather than >, as SAELens: signed architectures count too
        self.add("l0", active.sum())
        self.add("l1", z.double().abs().sum())
        self.fires += active.sum(0).cpu()


def evaluate_sae(model: Any, sae: Any, corpus: Iterable[str] | Int[Tensor, "rows pos"], *, site: Site | None = None,
                 config: EvalConfig | None = None, checks: SpliceChecks | None = None,
                 mask: Bool[Tensor, "rows pos"] | None = None) -> SAEEvaluation:
    """SAEBench's core figures for `sae` at its site (or `site`) over `corpus`: the project's one
    evaluator (the trainer's eval line, `latentpatch eval`, the demo and the release registry).

    `corpus` is an iterable of texts (read lazily, `batch_size` at a time, so a held-out split can
    stream in) or a (rows, pos) token tensor used as given; `mask` marks the real tokens of
    right-padded rows (`patching.model.tokens.padded_tokens` gives both). Scored: every real
    token whose id is not ignored (`EvalConfig.ignore_tokens`, by default the tokenizer's BOS,
    EOS, PAD, SEP and decoder-start ids, as SAELens). The SAE is checked against the model as a
    splice checks it, and the mask is checked, before the first forward pass.
    """
    (evaluation,) = evaluate_saes(model, [sae], corpus, sites=None if site is None else [site], config=config,
                                  checks=checks, mask=mask)
    return evaluation


def evaluate_saes(model: Any, saes: Sequence[Any], corpus: Iterable[str] | Int[Tensor, "rows pos"], *,
                  sites: Sequence[Site | None] | None = None, config: EvalConfig | None = None,
                  checks: SpliceChecks | None = None, mask: Bool[Tensor, "rows pos"] | None = None,
                  shared: bool | None = None) -> list[SAEEvaluation]:
    """`evaluate_sae` for several SAEs (at one site or many) over one pass through `corpus`: the
    same figures, each SAE's as if evaluated alone, with the clean run made once per batch and the
    spliced and ablated runs of a `resid_pre` site started at its block (`patching.splice.eval_runs`).
    `shared=False` forces three whole forwards per SAE (the reference the shared runs are tested
    against); None shares where the backend can. Every SAE is checked before the first forward."""
    config = EvalConfig() if config is None else config
    if not saes:
        raise ValueError("evaluate_saes needs at least one SAE")
    sites = [None] * len(saes) if sites is None else list(sites)
    if len(sites) != len(saes):
        raise ValueError(f"sites names {len(sites)} sites for {len(saes)} SAEs")
    resolved = [resolve_site(model, sae, site, checks=checks) for sae, site in zip(saes, sites)]
    shared = starts_at_block(model, [site for site, _ in resolved]) if shared is None else shared
    batches = token_batches(model, corpus, batch_size=config.batch_size, context_size=config.context_size, mask=mask)
    ignored = torch.tensor(ignored_token_ids(model, config.ignore_tokens), dtype=torch.long)
    sums = [_Sums(d_in=a.d_in, d_sae=a.d_sae, massive_norm_ratio=config.massive_norm_ratio) for _, a in resolved]
    names = ", ".join(dict.fromkeys(site.hook_name for site, _ in resolved))
    bar = tqdm(desc=f"eval {names}", unit="tok", disable=not config.progress, total=config.max_tokens)
    with bar:
        for tokens, real in batches:
            device = tl_compat.model_device(model)
            tokens, real = tokens.to(device), real.to(device)
            keep = real & ~torch.isin(tokens, ignored.to(device))
            before = sums[0].n
            _evaluate_batch(model, resolved, tokens, real, keep, sums, checks, shared)
            for s in sums:
                s.n_texts += tokens.shape[0]
            bar.update(sums[0].n - before)
            if config.max_tokens is not None and sums[0].n >= config.max_tokens:
                break
    out = []
    for (site, adapted), s in zip(resolved, sums):
        if s.n == 0 or s.n_loss == 0:
            raise ValueError(f"the corpus gave no evaluable tokens at {site.hook_name} ({s.n_texts} rows read; "
                             f"ignored ids {ignored.tolist()})")
        signed = max_decoder_cosine(adapted.W_dec, chunk=config.cosine_chunk, absolute=False)
        out.append(_finish(site, s, max_decoder_cosine(adapted.W_dec, chunk=config.cosine_chunk), signed, config))
    return out


@torch.inference_mode()
def _evaluate_batch(model: Any, resolved: list[tuple[Site, Any]], tokens: Tensor, real: Tensor, keep: Tensor,
                    sums: list[_Sums], checks: SpliceChecks | None, shared: bool) -> None:
    """Every run of one batch (`eval_runs.batch_runs`: clean, ablated per site, spliced per SAE),
    each reduced to its sums before the next run is made."""
    # cross_entropy scores target t+1 where mask[t+1]; SAELens drops the prediction made *from* an
    # ignored token, and padding is never a target
    loss_mask = torch.zeros_like(keep)
    loss_mask[:, 1:] = keep[:, :-1] & real[:, 1:]
    n_loss, n_keep = int(loss_mask.sum()), int(keep.sum())
    logits_clean: Tensor | None = None
    for run in batch_runs(model, resolved, tokens, keep, checks, shared=shared):
        if run.kind == "clean":
            logits_clean = run.logits
            ce = cross_entropy(run.logits, tokens, loss_mask) * n_loss if n_loss else 0.0
            for s in sums:
                s.add("ce_clean", ce)
            continue
        assert logits_clean is not None
        ce = cross_entropy(run.logits, tokens, loss_mask) * n_loss if n_loss else 0.0
        kl = kl_divergence(logits_clean, run.logits, keep) * n_keep if n_keep else 0.0
        if run.kind == "ablated":
            for (site, _), s in zip(resolved, sums):
                if site == run.index:
                    s.add("ce_ablated", ce)
                    s.add("kl_ablated", kl)
            continue
        s = sums[run.index]
        s.add("ce_spliced", ce)
        s.add("kl_spliced", kl)
        s.n_loss += n_loss
        if n_keep:
            x = run.record.inputs[keep]  # (token, d_in)
            s.add_tokens(x, x - run.record.error[keep], run.record.latents[keep])


def _finish(site: Site, sums: _Sums, max_cos: Tensor, signed: Tensor, config: EvalConfig) -> SAEEvaluation:
    t, n = sums.totals, sums.n
    ce_clean, ce_spliced, ce_ablated = (t[k] / sums.n_loss for k in ("ce_clean", "ce_spliced", "ce_ablated"))
    kl_spliced, kl_ablated = t["kl_spliced"] / n, t["kl_ablated"] / n
    density = sums.fires.double() / n
    return SAEEvaluation(
        site=site.hook_name,
        ce_loss_score=ce_loss_recovered(ce_clean, ce_spliced, ce_ablated), ce_loss_with_sae=ce_spliced,
        ce_loss_without_sae=ce_clean, ce_loss_with_ablation=ce_ablated,
        kl_div_score=kl_div_score(kl_spliced, kl_ablated), kl_div_with_sae=kl_spliced, kl_div_with_ablation=kl_ablated,
        explained_variance=explained_variance_from_sums(t["sse"], t["sum_sq"], sums.sum_x, n),
        explained_variance_typical=explained_variance_from_sums(t["sse_typical"], t["sum_sq_typical"],
                                                                sums.sum_x_typical, sums.n_typical),
        n_massive=n - sums.n_typical,
        mse=t["sse"] / (n * sums.d_in), mse_per_token=t["sse"] / n, cossim=t["cossim"] / n,
        l2_norm_in=t["l2_in"] / n, l2_norm_out=t["l2_out"] / n, l2_ratio=t["l2_ratio"] / n,
        relative_reconstruction_bias=t["xhat_sq"] / t["x_dot_xhat"],
        l0=t["l0"] / n, l1=t["l1"] / n,
        frac_dead=(sums.fires == 0).double().mean().item(),
        frac_dense=(density > config.dense_threshold).double().mean().item(),
        frac_over_1_percent=(density > 0.01).double().mean().item(), dense_threshold=config.dense_threshold,
        decoder_cosine={**cosine_summary(max_cos), "average_max_decoder_cosine_sim": signed.nanmean().item()}, n_tokens=n, n_loss_positions=sums.n_loss, n_texts=sums.n_texts,
        feature_density=density.float(), max_decoder_cosine=max_cos,
    )

