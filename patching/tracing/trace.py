"""ROME's causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT",
§2.1 and Fig. 1-2): corrupt the subject's embeddings with Gaussian noise, then restore clean
values one at a time and read how much of the answer's probability comes back.

Restorations, each at (layer, position):
- `state`: the residual stream entering block `layer` (`resid_pre`; ROME's hidden state after
  block `layer - 1`);
- `mlp` / `attn`: the MLP or attention outputs of a window of `window` layers centred on `layer`
  (ROME uses 10), as ROME's `trace_with_patch` lays windows out;
- `state` with `sever="mlp"` (or `"attn"`): the state restored while every MLP (attention) output
  at that token, from `layer` on, is frozen at its corrupted value. The gap to the plain state
  trace is what the severed modules carried (ROME Fig. 3).

Batched as the sweep engine batches: rows are (layer, noise draw) pairs of one restored
position; each runs only the positions from that one on (the noised runs' keys and values stand
in for the earlier ones) and joins the batch at its first restored layer, from the cached noised
residual stream; only the last position is unembedded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from patching.errors import PatchingError
from patching.figures import subplots
from patching.model import tl_compat
from patching.model.checks import check_token_batch
from patching.model.provenance import provenance
from patching.model.sites import Site
from patching.saved import SavedResult
from patching.tracing.noise import NoiseConfig, subject_positions

TraceKind = Literal["state", "mlp", "attn"]


@dataclass(frozen=True)
class TraceResult(SavedResult):
    """One causal trace of one prompt."""

    kind: str
    """`state`, `mlp` or `attn`: what was restored."""
    sever: str | None
    """Module kind frozen at its corrupted value at the restored token (state traces), or None."""
    window: int
    """Layers per restored window (`mlp` / `attn`); 1 for states."""
    prob: Tensor
    """Answer probability with each restoration, averaged over noise draws, (n_layers, pos)."""
    p_clean: float
    """Answer probability on the clean prompt."""
    p_corrupted: float
    """Answer probability with the subject noised, averaged over draws."""
    tokens: list[str]
    """The prompt's tokens, as strings."""
    subject: tuple[int, ...]
    """Noised positions."""
    answer: int
    """Token id of the answer."""
    provenance: dict[str, Any] = field(default_factory=dict, compare=False)
    """What produced it (`patching.model.provenance.provenance`)."""

    @property
    def effect(self) -> Tensor:
        """(p_restored − p_corrupted) / (p_clean − p_corrupted): 1 = restoring this brings the answer back."""
        return (self.prob - self.p_corrupted) / (self.p_clean - self.p_corrupted)

    def peak(self, positions: Sequence[int] | None = None) -> tuple[int, int, float]:
        """(layer, position, prob) of the largest restored probability, optionally among `positions`."""
        prob = self.prob if positions is None else self.prob[:, list(positions)]
        prob = prob.nan_to_num(nan=-1.0)  # layers not traced
        layer, col = divmod(int(prob.argmax()), prob.shape[1])
        return layer, (col if positions is None else list(positions)[col]), float(prob[layer, col])

    def to_dataframe(self) -> Any:
        """One row per (layer, position): the token, the restored probability and the effect."""
        import pandas as pd

        effect = self.effect
        return pd.DataFrame([{"layer": layer, "position": pos, "token": self.tokens[pos],
                              "prob": float(self.prob[layer, pos]), "effect": float(effect[layer, pos])}
                             for layer in range(self.prob.shape[0]) for pos in range(self.prob.shape[1])])

    def plot(self, path: str | Path) -> Path:
        """ROME's heatmap: restored answer probability, positions (rows) by layers (columns)."""
        fig, ax = subplots(figsize=(max(5, self.prob.shape[0] * 0.25) + 2, max(3, len(self.tokens) * 0.3)))
        image = ax.imshow(self.prob.T.numpy(), aspect="auto", cmap="Purples")
        ax.set_yticks(range(len(self.tokens)), [t + ("*" if i in self.subject else "") for i, t in enumerate(self.tokens)],
                      fontsize=7)
        ax.set_xlabel(f"layer ({self.kind}{', window ' + str(self.window) if self.kind != 'state' else ''})")
        ax.set_title(f"p(answer) restored; clean {self.p_clean:.3f}, corrupted {self.p_corrupted:.3f}", fontsize=9)
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(Path(path), dpi=120)
        return Path(path)


@dataclass
class _Runs:
    clean: dict[str, Tensor]
    """Clean activations by hook name, (pos, width)."""
    noised: dict[str, Tensor]
    """Noised activations by hook name, (n_samples, pos, width)."""
    tokens: Tensor
    """The prompt, (1, pos)."""
    p_noised: float
    """Answer probability of the noised runs, averaged over draws."""
    keys_values: Any
    """The noised runs' keys and values at every position, one row per draw (frozen)."""

    def prefix(self, n: int) -> Any:
        """The noised runs' keys and values before position `n`: a slice of the whole prompt's,
        since noise at or after `n` cannot reach the positions before it."""
        return tl_compat.cache_before(self.keys_values, self.tokens.shape[1], n)


def causal_trace(model: Any, prompt: str | Tensor, subject: str | Sequence[int], answer: str | int, *,
                 noise: NoiseConfig, kind: TraceKind = "state", window: int = 10,
                 sever: Literal["mlp", "attn"] | None = None, layers: Sequence[int] | None = None,
                 batch_size: int = 320) -> TraceResult:
    """Trace `prompt` with `subject` noised: the answer's probability as each (layer, position) is
    restored (see the module docstring for the kinds); `layers` restricts the rows computed (the
    others hold NaN). `batch_size` bounds the rows of one forward pass (a restoration's draws stay
    together, so at least `n_samples`); a position's restorations at every layer fit the default
    for 10 draws and 30 layers. Raises if noising does not move the answer's probability (nothing
    to restore)."""
    tokens, subject_pos, answer_id = _check(model, prompt, subject, answer, kind, window, sever, noise, batch_size)
    n_layers = tl_compat.n_layers(model)
    layers = list(range(n_layers)) if layers is None else [Site(layer).check(model).layer for layer in layers]
    with torch.inference_mode():
        runs, p_clean, p_noised = _reference_runs(model, tokens, subject_pos, answer_id, noise)
        if p_clean == p_noised:
            raise PatchingError(f"the noise leaves the answer's probability unchanged ({p_clean:.6g}): effects cannot be "
                                "normalised; raise NoiseConfig.scale or check the subject positions")
        prob = torch.full((n_layers, tokens.shape[1]), float("nan"))
        prob[layers] = runs.p_noised  # before the first noised position nothing differs to restore
        for position in range(min(subject_pos), tokens.shape[1]):
            plans = [_plan(model, runs, layer, position, kind, window, sever) for layer in layers]
            prob[layers, position] = _trace_position(model, runs, position, plans, answer_id, noise.n_samples, batch_size)
    return TraceResult(kind=kind, sever=sever, window=window if kind != "state" else 1, prob=prob, p_clean=p_clean,
                       p_corrupted=p_noised, tokens=tl_compat.to_str_tokens(model, tokens[0]), subject=subject_pos,
                       answer=answer_id,
                       provenance=provenance(model, prompts=[tl_compat.to_string(model, tokens[0])],
                                             metric=f"p(token {answer_id})", direction="denoise",
                                             noise=dataclasses.asdict(noise), layers=layers))


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The layers restored around `layer`, as ROME centres its windows (clipped at both ends)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def noise_hook(noise: Tensor, positions: tuple[int, ...]):
    """Add `noise` (n_samples, len(positions), d_model) at `positions` of a batch of n_samples rows.

    Added at resid_pre of block 0: token embedding plus any learned positional embedding, so
    adding it there equals adding it to the token embedding (ROME) for every position scheme."""
    def hook(x: Tensor) -> Tensor:
        x = x.clone()
        x[:, list(positions)] += noise.to(x.dtype)
        return x
    return hook


def _reference_runs(model: Any, tokens: Tensor, subject_pos: tuple[int, ...], answer: int,
                    noise: NoiseConfig) -> tuple[_Runs, float, float]:
    names = _hook_names(model)
    final, clean = tl_compat.run_until_end_with_cache(model, tokens, names)
    p_clean = float(_answer_prob(model, final, answer)[0])
    drawn = noise.draw(len(subject_pos), tl_compat.d_model(model))
    handle = tl_compat.attach_hook(model, Site(0).hook_name, noise_hook(drawn, subject_pos))
    try:
        # the same forward keeps its keys and values: every restored position's prefix is a slice of them
        final, noised, keys_values = tl_compat.run_until_end_with_keys_values(model, tokens.expand(noise.n_samples, -1),
                                                                              names)
    finally:
        handle.remove()
    p_noised = float(_answer_prob(model, final, answer).mean())
    runs = _Runs({k: v[0] for k, v in clean.items()}, noised, tokens, p_noised, keys_values)
    return runs, p_clean, p_noised


def _hook_names(model: Any) -> list[str]:
    kinds = ["resid_pre", "attn_out"] + (["mlp_out"] if tl_compat.d_mlp(model) else [])
    return [Site(layer, kind).hook_name for layer in range(tl_compat.n_layers(model)) for kind in kinds]


def _answer_prob(model: Any, final: Tensor, answer: int) -> Tensor:
    return torch.softmax(tl_compat.readout(model, final[:, -1]).float(), dim=-1)[:, answer]


@dataclass(frozen=True)
class _Plan:
    """One restoration at one position: where its rows join and what they write there."""

    start: int
    """The first layer it touches (where its rows join the batch)."""
    restored: tuple[str, ...]
    """Hooks whose clean value is written at the position (states: the start layer's resid_pre)."""
    frozen: tuple[str, ...]
    """Hooks held at their noised value there (severed modules)."""
    changes: bool
    """False when every restored value already equals the noised one in every draw (no forward)."""


def _plan(model: Any, runs: _Runs, layer: int, position: int, kind: str, window: int, sever: str | None) -> _Plan:
    n_layers = tl_compat.n_layers(model)
    if kind == "state":
        start, restored = layer, (Site(layer).hook_name,)
        frozen = () if sever is None else tuple(Site(i, f"{sever}_out").hook_name for i in range(layer, n_layers))
    else:
        layers = window_layers(layer, window, n_layers)
        start, restored, frozen = layers[0], tuple(Site(i, f"{kind}_out").hook_name for i in layers), ()
    changes = any(not torch.equal(runs.noised[name][:, position], runs.clean[name][position].expand_as(
        runs.noised[name][:, position])) for name in restored)
    return _Plan(start, restored, frozen, changes)


def _trace_position(model: Any, runs: _Runs, position: int, plans: list[_Plan], answer: int, n_samples: int,
                    batch_size: int) -> Tensor:
    """Mean answer probability for each plan's restoration at `position`, (len(plans),).

    Restoring at `position` leaves every earlier position as noised, so rows run only the
    positions from there on, after the noised runs' keys and values. Rows are (plan, draw), in
    start-layer order, and join the batch at their plan's start layer; a chunk holds whole plans."""
    out = torch.full((len(plans),), runs.p_noised)
    order = sorted((i for i, plan in enumerate(plans) if plan.changes), key=lambda i: plans[i].start)
    per_chunk = max(1, batch_size // n_samples)
    prefix = runs.prefix(position)
    for lo in range(0, len(order), per_chunk):
        chunk = order[lo : lo + per_chunk]
        row_draw = torch.arange(n_samples).repeat(len(chunk))  # rows are (plan, draw)
        starts = [plans[i].start for i in chunk]
        joins = [(start, runs.noised[Site(start).hook_name][:, position:].repeat(starts.count(start), 1, 1))
                 for start in sorted(set(starts))]
        writes: dict[str, list[tuple[Tensor, Tensor]]] = {}
        for k, i in enumerate(chunk):
            rows = torch.arange(k * n_samples, (k + 1) * n_samples)
            for name in plans[i].restored:
                writes.setdefault(name, []).append((rows, runs.clean[name][position].expand(n_samples, -1)))
            for name in plans[i].frozen:
                writes.setdefault(name, []).append((rows, runs.noised[name][:, position]))
        hooks = [(name, _write_hook(torch.cat([r for r, _ in items]), torch.cat([v for _, v in items])))
                 for name, items in writes.items()]
        cache = tl_compat.select_cache_rows(prefix, row_draw) if prefix is not None else None
        with tl_compat.hooks(model, hooks):
            final = tl_compat.run_blocks_joining(model, joins, cache)
        out[chunk] = _answer_prob(model, final, answer).reshape(len(chunk), n_samples).mean(1).cpu()
    return out


def _write_hook(rows: Tensor, values: Tensor):
    """Write `values` at the suffix's first position (the restored one) of `rows`: every hook sits
    at or after its rows' start layer, so they have joined the batch by then."""
    def hook(x: Tensor) -> Tensor:
        x = x.clone()
        x[rows, 0] = values.to(x.dtype)
        return x
    return hook


def _check(model: Any, prompt: str | Tensor, subject: str | Sequence[int], answer: str | int, kind: str, window: int,
           sever: str | None, noise: object, batch_size: int) -> tuple[Tensor, tuple[int, ...], int]:
    """Every input checked before the first forward pass."""
    if kind not in ("state", "mlp", "attn"):
        raise PatchingError(f"kind must be 'state', 'mlp' or 'attn', got {kind!r}")
    if sever not in (None, "mlp", "attn"):
        raise PatchingError(f"sever must be None, 'mlp' or 'attn', got {sever!r}")
    if sever is not None and kind != "state":
        raise PatchingError(f"sever applies to state traces; got kind={kind!r}")
    if "mlp" in (kind, sever) and not tl_compat.d_mlp(model):
        raise PatchingError("the model has no MLPs (attn-only): no mlp trace")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise PatchingError(f"window must be a positive int, got {window!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PatchingError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(noise, NoiseConfig):
        raise PatchingError(f"noise must be a NoiseConfig, got {type(noise).__name__}")
    tokens = tl_compat.to_tokens(model, prompt) if isinstance(prompt, str) else prompt
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.shape[0] != 1:
        raise PatchingError(f"prompt must be a string or a (1, pos) token tensor, got {getattr(tokens, 'shape', prompt)!r}")
    check_token_batch(tokens, "prompt", tl_compat.d_vocab(model), n_ctx=tl_compat.n_ctx(model))
    if isinstance(answer, str):
        ids = tl_compat.encode_text(model, answer)
        if len(ids) != 1:
            raise PatchingError(f"answer {answer!r} is {len(ids)} tokens; give a single-token answer or its id")
        answer = ids[0]
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < tl_compat.d_vocab(model):
        raise PatchingError(f"answer must be a token id in [0, {tl_compat.d_vocab(model)}), got {answer!r}")
    return tokens, subject_positions(model, tokens, subject), answer
