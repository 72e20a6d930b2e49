"""Steering with dictionary latents (chosen in `choice.py`): add or clamp them, generate.

A steering direction is a decoder row `W_dec[i]`; Top-1 steers with the single best latent for a
concept, Top-K with the K best (DESIGN.md, Steering). Two methods:

- `add`: `x <- x + c * v` at the SAE's site, with `v = sum_i w_i W_dec[i] / ||W_dec[i]||`
  rescaled to unit norm (`scale="unit"`: `c` is the L2 norm of what is added, the same for every
  K), or `v = sum_i w_i a_i W_dec[i]` with `a_i` the latent's typical activation and weights
  summing to 1 (`scale="activation"`: `c` counts typical activations). This is activation
  addition (Turner et al. 2023, "Activation Addition") along SAE directions (Templeton et al.
  2024, "Scaling Monosemanticity", section "Feature steering").
- `clamp`: set each chosen latent to `c` (or `c * a_i`) through the splice, i.e. a
  `LatentEdit(mode="set")`: the site outputs `x + decode(z') - decode(z)`.

Positions are absolute token indices (left padding included): `all`, `prompt`, `generated`
or explicit ones. Under `generate` with the key-value cache each step runs only the new
position; a hook before the site's block reads the cache length, so the same absolute
positions are steered with and without the cache.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from patching.configs import resolve_config
from patching.errors import SteeringError
from patching.model import tl_compat
from patching.model.checks import check_finite_in, check_generation, check_latent_indices
from patching.model.sites import Site
from patching.splice.collect import resolve_site
from patching.splice.edits import LatentEdit
from patching.splice.generate import Interventions, Sampling, Step, generate, intervening
from patching.splice.splicer import SpliceChecks
from patching.steering.choice import LatentChoice
from sae.deprecation import positional_config
from sae.protocol import SAELike

SteerMethod = Literal["add", "clamp"]
PositionMode = Literal["all", "prompt", "generated"]
SteerScale = Literal["unit", "activation"]
Weighting = Literal["uniform", "score"]
POSITION_MODES = ("all", "prompt", "generated")


@dataclass(frozen=True)
class SteeringConfig:
    """How to steer: method, strength, scale, weights and positions."""

    method: SteerMethod = "add"
    """`add` a direction to the site's activation, or `clamp` latents through the splice."""
    coefficient: float = 4.0
    """`c`: the norm added (`add`, scale `unit`), the value set (`clamp`, scale `unit`), or a
    multiple of typical activations (scale `activation`)."""
    scale: SteerScale = "unit"
    """`unit` or `activation` (see the module docstring); `activation` needs typical activations."""
    weighting: Weighting = "uniform"
    """`add` only: equal weights, or weights proportional to the ranking scores."""
    positions: PositionMode | tuple[int, ...] = "all"
    """`all`, `prompt`, `generated`, or absolute positions."""
    prompt_length: int | None = None
    """Positions below it are the prompt; None: the first forward pass in the block (or each
    `Steering.generate` call) fixes it."""

    def __post_init__(self) -> None:
        c = self.coefficient
        if isinstance(c, bool) or not isinstance(c, (int, float)):
            raise SteeringError(f"SteeringConfig.coefficient must be a real number (int or float), got "
                                f"{type(c).__name__} {c!r}")
        if not math.isfinite(c):
            raise SteeringError(f"SteeringConfig.coefficient must be finite, got {c}")
        for name, allowed in (("method", ("add", "clamp")), ("scale", ("unit", "activation")),
                              ("weighting", ("uniform", "score"))):
            if getattr(self, name) not in allowed:
                raise SteeringError(f"SteeringConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if isinstance(self.positions, str):
            if self.positions not in POSITION_MODES:
                raise SteeringError(f"SteeringConfig.positions must be one of {POSITION_MODES} or a tuple of "
                                    f"non-negative ints, got {self.positions!r}")
        else:
            object.__setattr__(self, "positions", _as_positions(self.positions))
        p = self.prompt_length
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise SteeringError(f"SteeringConfig.prompt_length must be a positive int or None, got {p!r}")


def _as_positions(positions: Any) -> tuple[int, ...]:
    try:
        items = tuple(operator.index(p) for p in positions if not isinstance(p, bool))
        ok = len(items) == len(positions) and len(items) > 0 and min(items) >= 0
    except TypeError:
        ok = False
    if not ok:
        raise SteeringError(f"SteeringConfig.positions must be non-empty non-negative ints, got {positions!r}")
    return tuple(sorted(set(items)))


Target = LatentChoice | Sequence[int] | int | Tensor


def _resolve_target(model: Any, sae: Any, target: Any, site: Site | None,
                    checks: SpliceChecks | None) -> tuple[Site, SAELike | None, LatentChoice | Tensor]:
    """Validate what is steered with, before anything is attached."""
    if isinstance(target, Tensor):
        if sae is None and site is None:
            raise SteeringError("a steering vector needs site= (or the SAE whose site it is)")
        if sae is None:
            width = site.check(model).width(model)
        else:
            site, sae = resolve_site(model, sae, site, checks=checks)
            width = sae.d_in
        if tuple(target.shape) != (width,) or not torch.is_floating_point(target) or not torch.isfinite(target).all():
            raise SteeringError(f"steering vector must be a finite float tensor of shape ({width},) (d_in at {site}); "
                                f"got shape {tuple(target.shape)}, dtype {target.dtype}")
        return site, sae, target
    if sae is None:
        raise SteeringError("steering with latents needs the SAE")
    if isinstance(target, LatentChoice) and site is None:
        site = target.site
    site, sae = resolve_site(model, sae, site, checks=checks)
    if not isinstance(target, LatentChoice):
        latents = check_latent_indices([target] if isinstance(target, int) else target, sae.d_sae, error=SteeringError)
        target = LatentChoice(site, latents, tuple(1.0 for _ in latents))
    elif target.site != site:
        raise SteeringError(f"the latents were chosen at {target.site} but the SAE sits at {site}")
    check_latent_indices(target.latents, sae.d_sae, error=SteeringError)
    return site, sae, target


def steering_vector(sae: SAELike, choice: LatentChoice, config: SteeringConfig) -> Float[Tensor, " d_in"]:
    """`v` of the `add` method (module docstring); `add` adds `config.coefficient * v`."""
    with torch.no_grad():
        # `steer` checks the final vector, in the model's dtype, for what these checks cannot see
        # (e.g. finite scores whose sum overflows).
        rows = sae.W_dec[list(choice.latents)].float()  # (k, d_in)
        scores = torch.tensor(choice.scores, dtype=torch.float32)
        if config.weighting == "score" and not (torch.isfinite(scores).all() and (scores > 0).all()):
            raise SteeringError(f"weighting='score' needs positive finite scores, got {choice.scores}")
        weights = scores / scores.sum() if config.weighting == "score" else torch.full_like(scores, 1 / len(scores))
        if config.scale == "activation":
            acts = torch.tensor(_typical(choice), dtype=torch.float32)
            return (weights * acts) @ rows
        norms = rows.norm(dim=-1, keepdim=True)  # (k, 1)
        if not (norms > 0).all():
            zero = [choice.latents[i] for i in torch.nonzero(norms.flatten() == 0).flatten().tolist()]
            raise SteeringError(f"scale='unit' normalises decoder rows, but latent(s) {zero} have a zero decoder row "
                                "(expected norm > 0): choose other latents")
        vector = weights @ (rows / norms)
        if not vector.norm() > 0:
            raise SteeringError(f"the chosen decoder rows {list(choice.latents)} cancel out (norm 0): nothing to steer along")
        return vector / vector.norm()


def _typical(choice: LatentChoice) -> tuple[float, ...]:
    if choice.typical_activations is None:
        raise SteeringError("scale='activation' needs typical activations: choose latents with contrast_latents, "
                            "or use scale='unit'")
    if not all(math.isfinite(a) for a in choice.typical_activations):
        raise SteeringError(f"scale='activation' needs finite typical activations, got {choice.typical_activations}")
    return choice.typical_activations


class Steering:
    """The live state of a `steer(...)` block; `generate` decodes in it (`patching.splice.generate`)."""

    def __init__(self, model: Any, site: Site, config: SteeringConfig, *, vector: Tensor | None,
                 choice: LatentChoice | None, sae: SAELike | None = None) -> None:
        self.model = model
        self.site = site
        self.config = config
        self.vector = vector
        """`c * v` for `add` (on the model's device and dtype); None for `clamp`."""
        self.choice = choice
        self.sae = sae
        self.prompt_length = config.prompt_length

    def interventions(self, checks: SpliceChecks | None = None) -> Interventions:
        """The steering as interventions: a hook adding `c * v` (`add`), or latent edits of the
        spliced SAE (`clamp`), at the configured absolute positions of each forward pass."""
        if self.config.method == "add":
            return Interventions(hooks={self.site: self._add})
        return Interventions(saes={self.site: self.sae}, latent_edits=self._clamp_edits,
                             checks=checks)

    def _selected(self, step: Step) -> list[int]:
        """The configured absolute positions of this forward pass, relative to its first."""
        if self.prompt_length is None and step.past == 0:
            self.prompt_length = step.n_positions
        mode = self.config.positions
        if mode == "all":
            return list(range(step.n_positions))
        if mode == "prompt":
            return [p - step.past for p in step.positions if p < self.prompt_length]
        if mode == "generated":
            return [p - step.past for p in step.positions if p >= self.prompt_length]
        wanted = set(mode)
        return [p - step.past for p in step.positions if p in wanted]

    def clamp_values(self) -> Tensor:
        """What `clamp` sets each chosen latent to, `(k,)` in float64 (checked in the model's dtype by `steer`)."""
        assert self.choice is not None
        c = self.config.coefficient
        if self.config.scale == "activation":
            return torch.tensor([c * a for a in _typical(self.choice)], dtype=torch.float64)
        return torch.full((len(self.choice.latents),), float(c), dtype=torch.float64)

    def _clamp_edits(self, step: Step) -> list[LatentEdit]:
        selected = self._selected(step)
        if not selected:
            return []
        assert self.choice is not None
        return [LatentEdit(self.site, self.choice.latents, self.clamp_values().float(), mode="set", positions=selected)]

    def _add(self, x: Tensor, step: Step) -> Tensor:
        selected = self._selected(step)
        if not selected:
            return x
        if len(selected) == x.shape[1]:
            return x + self.vector
        out = x.clone()
        out[:, selected] = out[:, selected] + self.vector
        return out

    def generate(self, prompts: str | list[str] | Tensor, *, max_new_tokens: int = 32, use_kv_cache: bool = True,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float | None = None,
                 seed: int | None = None) -> Tensor:
        """Steered generation; returns prompt + continuation token ids.

        Texts are tokenized with BOS (a list is left-padded, the padding masked). The prompt
        length is reset for each call unless the config fixes it.
        """
        check_generation(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         error=SteeringError)
        self.prompt_length = self.config.prompt_length
        return _generate(self.model, prompts, max_new_tokens=max_new_tokens, use_kv_cache=use_kv_cache,
                         sampling=Sampling(do_sample, temperature, top_p), seed=seed)


def _generate(model: Any, prompts: str | list[str] | Tensor, *, max_new_tokens: int, use_kv_cache: bool,
              sampling: Sampling, seed: int | None) -> Tensor:
    tokens, mask = tl_compat.left_padded_tokens(model, prompts)
    # A private generator, not torch.manual_seed: the caller's global random stream stays as it was.
    generator = None if seed is None else tl_compat.seeded_generator(model, seed)
    return generate(model, tokens, max_new_tokens, use_kv_cache=use_kv_cache, attention_mask=mask, sampling=sampling,
                    generator=generator)


@positional_config
@contextlib.contextmanager
def steer(model: Any, sae: Any, target: Target, *, config: SteeringConfig | None = None, site: Site | None = None,
          checks: SpliceChecks | None = None, **overrides: Any) -> Iterator[Steering]:
    """Steer `model` for the duration of the block; yields the `Steering`.

    `target` is a `LatentChoice` (e.g. `contrast_latents(...).top(1)`), latent indices, or a
    steering vector `(d_in,)` (`add` only; `sae` may then be None if `site` is given).
    `overrides` replace fields of `config` (`steer(model, sae, choice, coefficient=8.0)`).
    Everything is validated before the first hook is attached; every hook is removed on exit.
    """
    config = resolve_config(SteeringConfig, config, overrides, error=SteeringError)
    site, sae, resolved = _resolve_target(model, sae, target, site, checks)
    if config.method == "clamp" and isinstance(resolved, Tensor):
        raise SteeringError("method='clamp' sets latents: pass latents or a LatentChoice, not a vector")
    dtype = tl_compat.model_dtype(model)
    if config.method == "add":
        vector = resolved if isinstance(resolved, Tensor) else steering_vector(sae, resolved, config)
        vector = check_finite_in((config.coefficient * vector.detach()).to(dtype), dtype,
                                 f"the steering vector (coefficient {config.coefficient} * v)", error=SteeringError)
        state = Steering(model, site, config, vector=vector.to(tl_compat.model_device(model)),
                         choice=None if isinstance(resolved, Tensor) else resolved)
    else:
        state = Steering(model, site, config, vector=None, choice=resolved, sae=sae)
        # refuse now, not in the middle of a forward pass: the values set, in the model's dtype
        check_finite_in(state.clamp_values(), dtype, f"the clamp values (coefficient {config.coefficient})",
                        error=SteeringError)
    with intervening(model, state.interventions(checks)):
        yield state


@dataclass(frozen=True)
class SteeredGeneration:
    """Steered and unsteered continuations of the same prompts, side by side."""

    prompts: list[str]
    """The prompts (decoded, padding removed)."""
    steered: list[str]
    """Continuations with steering."""
    unsteered: list[str]
    """Continuations without."""
    steered_tokens: Tensor
    """Prompt + steered continuation token ids, `(batch, pos + new)`."""
    unsteered_tokens: Tensor
    """Prompt + unsteered continuation token ids."""
    config: SteeringConfig
    """How the steered run was steered."""

    def side_by_side(self) -> str:
        blocks = [f"{self.config}"]
        for prompt, steered, unsteered in zip(self.prompts, self.steered, self.unsteered):
            blocks.append(f"prompt:     {prompt!r}\n  unsteered: {unsteered!r}\n  steered:   {steered!r}")
        return "\n".join(blocks)


@positional_config
def generate_steered(model: Any, sae: Any, target: Target, prompts: str | list[str] | Tensor, *,
                     config: SteeringConfig | None = None, max_new_tokens: int = 32, do_sample: bool = False,
                     temperature: float = 1.0, top_p: float | None = None, seed: int = 0, use_kv_cache: bool = True,
                     site: Site | None = None, checks: SpliceChecks | None = None,
                     **overrides: Any) -> SteeredGeneration:
    """Generate from `prompts` without and with steering (same seed), for comparison."""
    check_generation(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, error=SteeringError)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p)
    Sampling(do_sample, temperature, top_p)  # refuse bad sampling settings before steering attaches anything
    with steer(model, sae, target, config=config, site=site, checks=checks, **overrides) as state:
        steered = state.generate(prompts, use_kv_cache=use_kv_cache, seed=seed, **kwargs)
    unsteered = _generate(model, prompts, max_new_tokens=max_new_tokens, use_kv_cache=use_kv_cache,
                          sampling=Sampling(do_sample, temperature, top_p), seed=seed)
    start = steered.shape[1] - max_new_tokens
    texts = [_decode(model, row[:start]) for row in steered]
    return SteeredGeneration(texts, [_decode(model, row[start:]) for row in steered],
                             [_decode(model, row[start:]) for row in unsteered], steered, unsteered, state.config)


def _decode(model: Any, tokens: Tensor) -> str:
    if tl_compat.has_tokenizer(model):
        special = torch.tensor(tl_compat.special_token_ids(model))
        tokens = tokens[~torch.isin(tokens.cpu(), special)]
    return tl_compat.to_string(model, tokens)
