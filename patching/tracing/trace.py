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

Batched as the sweep engine batches: every restoration starts at its first restored layer from
the cached corrupted residual stream, rows are (position, noise draw) pairs of one start layer,
and only the last position is unembedded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from patching.errors import PatchingError
from patching.model import tl_compat
from patching.model.sites import Site
from patching.tracing.noise import NoiseConfig, subject_positions

TraceKind = Literal["state", "mlp", "attn"]


@dataclass(frozen=True)
class TraceResult:
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


@dataclass
class _Runs:
    clean: dict[str, Tensor]
    """Clean activations by hook name, (pos, width)."""
    noised: dict[str, Tensor]
    """Noised activations by hook name, (n_samples, pos, width)."""
    tokens: Tensor
    """The prompt, (1, pos)."""
    drawn: Tensor
    """The noise draws, (n_samples, len(subject), d_model)."""
    subject: tuple[int, ...]
    """Noised positions."""
    p_noised: float
    """Answer probability of the noised runs, averaged over draws."""
    prefixes: dict[int, Any] = field(default_factory=dict)
    """Noised key-value caches of the first `n` positions, one row per draw, by `n`."""

    def prefix(self, model: Any, n: int) -> Any:
        """The noised runs' keys and values before position `n` (computed once per `n`)."""
        if n not in self.prefixes:
            keep = [i for i, p in enumerate(self.subject) if p < n]
            add = noise_hook(self.drawn[:, keep], tuple(self.subject[i] for i in keep))
            with tl_compat.hooks(model, [(Site(0).hook_name, add)] if keep else []):
                self.prefixes[n] = tl_compat.prefix_cache(model, self.tokens[:, :n].expand(self.drawn.shape[0], -1))
        return self.prefixes[n]


def causal_trace(model: Any, prompt: str | Tensor, subject: str | Sequence[int], answer: str | int, *,
                 noise: NoiseConfig, kind: TraceKind = "state", window: int = 10,
                 sever: Literal["mlp", "attn"] | None = None, layers: Sequence[int] | None = None,
                 batch_size: int = 64) -> TraceResult:
    """Trace `prompt` with `subject` noised: the answer's probability as each (layer, position) is
    restored (see the module docstring for the kinds); `layers` restricts the rows computed (the
    others hold NaN). Raises if noising does not move the answer's probability (nothing to restore)."""
    tokens, subject_pos, answer_id = _check(model, prompt, subject, answer, kind, window, sever, noise, batch_size)
    n_layers = tl_compat.n_layers(model)
    layers = list(range(n_layers)) if layers is None else [Site(layer).check(model).layer for layer in layers]
    with torch.inference_mode():
        runs, p_clean, p_noised = _reference_runs(model, tokens, subject_pos, answer_id, noise)
        if p_clean == p_noised:
            raise PatchingError(f"the noise leaves the answer's probability unchanged ({p_clean:.6g}): effects cannot be "
                                "normalised; raise NoiseConfig.scale or check the subject positions")
        prob = torch.full((n_layers, tokens.shape[1]), float("nan"))
        for layer in layers:
            prob[layer] = _trace_layer(model, runs, layer, kind, window, sever, answer_id, noise.n_samples, batch_size)
    return TraceResult(kind=kind, sever=sever, window=window if kind != "state" else 1, prob=prob, p_clean=p_clean,
                       p_corrupted=p_noised, tokens=tl_compat.to_str_tokens(model, tokens[0]), subject=subject_pos,
                       answer=answer_id)


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
        final, noised = tl_compat.run_until_end_with_cache(model, tokens.expand(noise.n_samples, -1), names)
    finally:
        handle.remove()
    p_noised = float(_answer_prob(model, final, answer).mean())
    runs = _Runs({k: v[0] for k, v in clean.items()}, noised, tokens, drawn, subject_pos, p_noised)
    return runs, p_clean, p_noised


def _hook_names(model: Any) -> list[str]:
    kinds = ["resid_pre", "attn_out"] + (["mlp_out"] if tl_compat.d_mlp(model) else [])
    return [Site(layer, kind).hook_name for layer in range(tl_compat.n_layers(model)) for kind in kinds]


def _answer_prob(model: Any, final: Tensor, answer: int) -> Tensor:
    return torch.softmax(tl_compat.readout(model, final[:, -1]).float(), dim=-1)[:, answer]


def _trace_layer(model: Any, runs: _Runs, layer: int, kind: str, window: int, sever: str | None, answer: int,
                 n_samples: int, batch_size: int) -> Tensor:
    """Mean answer probability for each position's restoration at `layer`, (pos,).

    Before the first noised position the clean and noised runs agree, so a restoration there
    changes nothing: those positions get the noised probability without a forward pass. A chunk
    of positions runs only from its first position on, the noised runs' keys and values standing
    in for the positions before it (restoring at p leaves every earlier position as noised)."""
    n_layers, n_pos = tl_compat.n_layers(model), runs.tokens.shape[1]
    if kind == "state":
        start, restored, frozen = layer, [], ([] if sever is None else range(layer, n_layers))
    else:
        layers = window_layers(layer, window, n_layers)
        start, restored, frozen = layers[0], [Site(i, f"{kind}_out").hook_name for i in layers], []
    frozen_names = [Site(i, f"{sever}_out").hook_name for i in frozen]
    per_chunk = max(1, batch_size // n_samples)
    first = min(runs.subject)
    out = torch.full((n_pos,), runs.p_noised)
    for lo in range(first, n_pos, per_chunk):
        positions = torch.arange(lo, min(n_pos, lo + per_chunk))
        row_pos = positions.repeat_interleave(n_samples)  # rows are (position, draw)
        row_draw = torch.arange(n_samples).repeat(len(positions))
        residual = runs.noised[Site(start).hook_name][row_draw, lo:].clone()
        rows, at = torch.arange(len(row_pos)), row_pos - lo  # positions within the suffix
        if kind == "state":
            residual[rows, at] = runs.clean[Site(layer).hook_name][row_pos]
        writes = [(name, runs.clean[name][row_pos]) for name in restored]
        writes += [(name, runs.noised[name][row_draw, row_pos]) for name in frozen_names]
        cache = tl_compat.select_cache_rows(runs.prefix(model, lo), row_draw) if lo > 0 else None
        with tl_compat.hooks(model, [(name, _write_hook(rows, at, values)) for name, values in writes]):
            final = tl_compat.run_blocks(model, residual, start, cache)
        out[positions] = _answer_prob(model, final, answer).reshape(len(positions), n_samples).mean(1).cpu()
    return out


def _write_hook(rows: Tensor, positions: Tensor, values: Tensor):
    def hook(x: Tensor) -> Tensor:
        x = x.clone()
        x[rows, positions] = values.to(x.dtype)
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
    if isinstance(answer, str):
        ids = tl_compat.encode_text(model, answer)
        if len(ids) != 1:
            raise PatchingError(f"answer {answer!r} is {len(ids)} tokens; give a single-token answer or its id")
        answer = ids[0]
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < tl_compat.d_vocab(model):
        raise PatchingError(f"answer must be a token id in [0, {tl_compat.d_vocab(model)}), got {answer!r}")
    return tokens, subject_positions(model, tokens, subject), answer
