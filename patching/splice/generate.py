"""Generation with interventions: the one decoding loop that steering and safety share.

Every forward pass is a `Step` that knows which absolute positions it runs: the whole prompt
first, then one new position per token with the key-value cache (or the whole sequence again
without it). Interventions see the step, so the same absolute positions are edited with and
without the cache:

- `hooks`: functions on a site's activation, `fn(x, step) -> new x or None`;
- `saes` and `latent_edits`: SAEs spliced in error-term mode and, for each step, the latent
  edits to apply (positions relative to the step's first position);
- `before_step`: called before each forward pass, e.g. to advance a guiding run in lock-step
  (dynamic activation patching, Chen et al. 2024, "Finding Safety Neurons in Large Language
  Models", section 4).

Rows of one call share their length; left padding is given as an attention mask whose zeros
are never attended. The model's hooks are restored however the loop is left (R5).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from patching.errors import PatchingError
from patching.model import tl_compat
from patching.model.checks import check_context
from patching.model.sites import Site
from patching.splice.splicer import Edit, Splice, SpliceChecks, splice


@dataclass(frozen=True)
class Step:
    """One forward pass under interventions: the absolute positions it runs."""

    past: int
    """Positions already held by the key-value cache (0 without a cache)."""
    n_positions: int
    """Positions this pass runs: absolute positions `past .. past + n_positions - 1`."""

    @property
    def positions(self) -> range:
        return range(self.past, self.past + self.n_positions)


SiteHook = Callable[[Tensor, Step], Tensor | None]


@dataclass(frozen=True)
class SharedPrefix:
    """Keys and values of a prefix that every prompt of a call starts with (e.g. a few-shot chat
    context), computed once. Its positions run without interventions."""

    tokens: Tensor
    """The prefix, `(1, length)`."""
    cache: Any
    """Its frozen key-value cache (`tl_compat.prefix_cache`)."""

    @classmethod
    def of(cls, model: Any, tokens: Tensor) -> "SharedPrefix":
        with torch.inference_mode():
            return cls(tokens.reshape(1, -1), tl_compat.prefix_cache(model, tokens.reshape(1, -1)))

    @property
    def length(self) -> int:
        return self.tokens.shape[1]


@dataclass(frozen=True)
class Interventions:
    """What changes the model during a generation (nothing by default)."""

    hooks: Mapping[Site, SiteHook] = field(default_factory=dict)
    """Per site, `fn(x (batch, n_positions, width), step)` returning the new activation or None."""
    saes: Mapping[Site, Any] = field(default_factory=dict)
    """SAEs spliced (error-term mode) for the generation, whose latents `latent_edits` edit."""
    latent_edits: Callable[[Step], Sequence[Edit]] | None = None
    """Per step, the latent edits of the spliced SAEs (positions relative to the step)."""
    before_step: Callable[[Step], None] | None = None
    """Called before each forward pass of the generating run."""
    checks: SpliceChecks | None = None
    """Which SAE/model mismatches the splice waives (see `SpliceChecks`); None waives none."""

    def __post_init__(self) -> None:
        if self.latent_edits is not None and not self.saes:
            raise PatchingError("Interventions.latent_edits needs the SAEs it edits (saes={Site: sae})")


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy by default."""

    do_sample: bool = False
    """Sample instead of taking the argmax."""
    temperature: float = 1.0
    """Sampling temperature (positive)."""
    top_p: float | None = None
    """Nucleus mass in (0, 1], or None for all tokens."""

    def __post_init__(self) -> None:
        t, p = self.temperature, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise PatchingError(f"Sampling.temperature must be a positive finite number, got {t!r}")
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise PatchingError(f"Sampling.top_p must be in (0, 1] or None, got {p!r}")

    def choose(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The next token per row; a sample draws from `generator` (None: torch's global RNG)."""
        if not self.do_sample:
            return logits.argmax(-1)
        return tl_compat.sample_logits(logits, temperature=self.temperature, top_p=self.top_p, generator=generator)


class Decoder:
    """One batch's decoding state: the tokens so far and, with the cache, their keys and values.

    `forward()` runs the positions not yet seen and returns the last position's logits;
    `append(next_tokens)` adds a token to each row. A guiding run is a second `Decoder`."""

    def __init__(self, model: Any, tokens: Int[Tensor, "batch pos"], *, use_kv_cache: bool = True,
                 attention_mask: Tensor | None = None, prefix: SharedPrefix | None = None) -> None:
        self.model = model
        self.tokens = tokens
        self.mask = torch.ones_like(tokens) if attention_mask is None else attention_mask.to(tokens.dtype)
        self._pending = tokens.shape[1]
        if prefix is not None and use_kv_cache:
            n = prefix.length
            if n >= tokens.shape[1] or not torch.equal(tokens[:, :n], prefix.tokens.to(tokens.device).expand(len(tokens), -1)):
                raise PatchingError(f"every row must start with the shared prefix ({n} tokens) and go beyond it")
            self._pending -= n
        self.cache = None if not use_kv_cache else tl_compat.new_kv_cache(
            model, tokens.shape[0], None if prefix is None else prefix.cache)

    @property
    def step(self) -> Step:
        """The positions the next `forward` runs."""
        if self.cache is None:
            return Step(0, self.tokens.shape[1])
        return Step(self.tokens.shape[1] - self._pending, self._pending)

    def forward(self) -> Tensor:
        step = self.step
        tokens, mask = self.tokens[:, step.past:], self.mask[:, step.past:]
        logits = tl_compat.forward_step(self.model, tokens, mask, self.cache, last_only=True)
        self._pending = 0
        return logits[:, -1]

    def append(self, next_tokens: Int[Tensor, " batch"]) -> None:
        self.tokens = torch.cat([self.tokens, next_tokens[:, None].to(self.tokens.dtype)], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self._pending += 1


class Live:
    """The attached interventions. A hook before the first intervened block turns each forward
    pass into a `Step` (reading the cache length), so plain forward passes inside the block and
    `generate`'s passes, cached or not, edit the same absolute positions."""

    def __init__(self, interventions: Interventions, state: Splice | None) -> None:
        self.interventions = interventions
        self.splice = state
        self.step: Step | None = None
        self._suspended = False

    def before_block(self, n_positions: int, past: int) -> None:
        if self._suspended:
            return
        self.step = Step(past, n_positions)
        if self.splice is not None and self.interventions.latent_edits is not None:
            self.splice.set_edits(list(self.interventions.latent_edits(self.step)))

    def hook(self, site: Site) -> Callable[[Tensor], Tensor | None]:
        fn = self.interventions.hooks[site]

        def run(x: Tensor) -> Tensor | None:
            return None if self._suspended or self.step is None else fn(x, self.step)

        return run

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Run other forward passes (a guiding run) with these interventions switched off."""
        edits = self.splice.edits if self.splice is not None else ()
        self._suspended = True
        try:
            if self.splice is not None:
                self.splice.set_edits([])
            yield
        finally:
            self._suspended = False
            if self.splice is not None:
                self.splice.set_edits(edits)


@contextlib.contextmanager
def intervening(model: Any, interventions: Interventions) -> Iterator[Live]:
    """Attach `interventions` for the block (SAEs first, then hooks); remove them on exit."""
    sites = list(interventions.hooks) + list(interventions.saes)
    for site in sites:
        if not isinstance(site, Site):
            raise PatchingError(f"intervention sites must be Site values, got {type(site).__name__} {site!r}")
        site.check(model)
    with contextlib.ExitStack() as stack:
        state = None
        if interventions.saes:
            state = stack.enter_context(splice(model, dict(interventions.saes), checks=interventions.checks))
        live = Live(interventions, state)
        if sites:
            first = min(site.layer for site in sites)
            stack.callback(tl_compat.attach_block_pre_hook(model, first, live.before_block).remove)
        for site in interventions.hooks:
            stack.callback(tl_compat.attach_hook(model, site.hook_name, live.hook(site)).remove)
        yield live


def generate(model: Any, tokens: Int[Tensor, "batch pos"], max_new_tokens: int, *,
             interventions: Interventions | None = None, use_kv_cache: bool = True,
             attention_mask: Tensor | None = None, sampling: Sampling | None = None,
             observe: Callable[[Step, Tensor], None] | None = None,
             prefix: SharedPrefix | None = None,
             generator: torch.Generator | None = None) -> Int[Tensor, "batch pos_new"]:
    """Prompt + continuation token ids, `(batch, pos + max_new_tokens)`, under `interventions`.

    Every row gets exactly `max_new_tokens` tokens (no stop at end-of-sequence), so rows stay
    aligned; callers cut at EOS when decoding. `observe(step, logits)`, if given, sees each
    pass's last-position logits `(batch, vocab)` before the token is chosen. With `prefix` (and
    the cache) the shared prefix's positions are not run again, and so are not intervened on.
    Sampling draws from `generator` (`tl_compat.seeded_generator(model, seed)`), or from torch's
    global RNG when it is None."""
    check_generation_inputs(tokens, max_new_tokens, attention_mask)
    check_context(tokens.shape[1] + max_new_tokens, tl_compat.n_ctx(model),
                  f"the prompt ({tokens.shape[1]} tokens) plus max_new_tokens={max_new_tokens}")
    interventions = interventions or Interventions()
    sampling = sampling or Sampling()
    decoder = Decoder(model, tokens, use_kv_cache=use_kv_cache, attention_mask=attention_mask, prefix=prefix)
    with torch.inference_mode(), intervening(model, interventions) as live:
        for _ in range(max_new_tokens):
            if interventions.before_step is not None:
                with live.suspended():
                    interventions.before_step(decoder.step)
            step = decoder.step
            logits = decoder.forward()
            if observe is not None:
                observe(step, logits)
            decoder.append(sampling.choose(logits, generator))
    return decoder.tokens.clone()  # an ordinary tensor, usable outside inference mode


def check_generation_inputs(tokens: Any, max_new_tokens: Any, attention_mask: Any = None) -> None:
    """Refuse bad inputs before any forward pass."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise PatchingError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise PatchingError(f"tokens must be a (batch >= 1, pos >= 1) tensor, got {shape}")
    if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.shape != tokens.shape):
        raise PatchingError(f"attention_mask must have the tokens' shape {tuple(tokens.shape)}, got "
                            f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")


def prompt_batches(prompts: Sequence[Tensor], prefix: SharedPrefix | None = None,
                   pad: bool = False) -> list[tuple[list[int], Tensor, Tensor | None]]:
    """`(indices, tokens, attention_mask)` per forward batch of `(1, pos)` prompts: equal lengths
    together, unpadded (exact); or, with `pad` and a shared `prefix`, every prompt in one batch, each
    row padded between the prefix and the rest (pads masked). TransformerLens takes rotary positions
    from the mask, so every row computes as it would unpadded, to float rounding (logits within 4e-5
    on the default model). One batch instead of one per length saves per-pass overhead and the
    per-batch work around each pass; on this CPU a decoding step is compute-bound, so the arithmetic
    stays the same and the saving is small.
    Padded positions shift a row's absolute positions: interventions that pick positions must not
    be used with `pad`."""
    if pad and prefix is not None and len({p.shape[-1] for p in prompts}) > 1:
        n, width = prefix.length, max(p.shape[-1] for p in prompts)
        rows, masks = [], []
        for p in prompts:
            p = p.reshape(1, -1)
            gap = width - p.shape[1]
            rows.append(torch.cat([p[:, :n], torch.zeros(1, gap, dtype=p.dtype, device=p.device), p[:, n:]], 1))
            masks.append(torch.cat([torch.ones(1, n, dtype=torch.long), torch.zeros(1, gap, dtype=torch.long),
                                    torch.ones(1, p.shape[1] - n, dtype=torch.long)], 1).to(p.device))
        return [(list(range(len(prompts))), torch.cat(rows), torch.cat(masks))]
    by_length: dict[int, list[int]] = {}
    for i, row in enumerate(prompts):
        by_length.setdefault(row.shape[-1], []).append(i)
    return [(indices, torch.cat([prompts[i].reshape(1, -1) for i in indices]), None) for indices in by_length.values()]


def generate_by_length(model: Any, prompts: Sequence[Tensor], max_new_tokens: int,
                       interventions: Callable[[list[int]], Interventions] | None = None,
                       use_kv_cache: bool = True, prefix: SharedPrefix | None = None,
                       pad: bool = False,
                       first_logits: Callable[[list[int], Tensor], None] | None = None) -> list[Tensor]:
    """Each `(1, pos)` prompt's continuation `(max_new_tokens,)`, prompts of equal length batched
    together (exact: no padding; `pad`: see `prompt_batches`); `interventions(indices)` builds each
    batch's interventions. `first_logits(indices, logits)`, if given, sees each batch's first
    step's last-position logits `(batch, vocab)`: the prompts' own next-token predictions."""
    out: list[Tensor | None] = [None] * len(prompts)
    for indices, batch, mask in prompt_batches(prompts, prefix if use_kv_cache else None, pad):
        spec = interventions(indices) if interventions is not None else None
        seen: list[bool] = []

        def observe(step: Step, logits: Tensor, indices: list[int] = indices, seen: list[bool] = seen) -> None:
            if first_logits is not None and not seen:
                seen.append(True)
                first_logits(indices, logits)

        tokens = generate(model, batch, max_new_tokens, interventions=spec, use_kv_cache=use_kv_cache, prefix=prefix,
                          attention_mask=mask, observe=observe)
        for row, i in enumerate(indices):
            out[i] = tokens[row, batch.shape[1]:]
    return out  # type: ignore[return-value]
