"""Every TransformerLens-specific call, in one place.

TransformerLens 3.x (what SAELens allows) provides `HookedTransformer`; 4.x replaces it with
`TransformerBridge`. Moving to the bridge should touch this module only: the rest of
latentpatch sees a model through these functions and through `torch.nn.Module` hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from patching.model.tl_bridge import TLModel

from patching.model import tl_bridge, tl_bridge_rows
from patching.model.tl_bridge import refuse_bridge  # noqa: F401  (re-exported: the door)
from patching.model.checks import check_context
from patching.model.tl_readout import frozen_final_readout, readout  # noqa: F401  (re-exported: one door to TransformerLens)

HookFn = Callable[[Tensor], Tensor | None]

PROCESSING_FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")


def is_supported_model(model: Any) -> bool:
    return isinstance(model, TLModel)


def tiny_config(**overrides: Any) -> Any:
    """A HookedTransformerConfig for tests and examples (random weights); TransformerLens 3.x only
    (imported here, not at module import, so that TransformerLens 4 can import the door)."""
    tl_bridge.require_hooked_transformer("a random HookedTransformer")
    from transformer_lens import HookedTransformerConfig

    defaults: dict[str, Any] = dict(
        n_layers=2, d_model=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=50, n_ctx=32,
        act_fn="gelu", normalization_type="LN", seed=0,
    )
    return HookedTransformerConfig(**{**defaults, **overrides})


def random_model(**overrides: Any) -> Any:
    """A random HookedTransformer (TransformerLens 3.x only)."""
    config = tiny_config(**overrides)
    from transformer_lens import HookedTransformer

    return HookedTransformer(config)


def n_layers(model: TLModel) -> int:
    return model.cfg.n_layers


def d_model(model: TLModel) -> int:
    return model.cfg.d_model


def d_mlp(model: TLModel) -> int | None:
    return model.cfg.d_mlp


def model_name(model: TLModel) -> str:
    return model.cfg.model_name


def hook_names(model: TLModel) -> set[str]:
    """The model's hook names (on the Bridge kept between reads: `tl_bridge.hook_points`)."""
    return set(tl_bridge.hook_points(model))


def hook_module(model: TLModel, hook_name: str) -> torch.nn.Module:
    return tl_bridge.hook_points(model)[hook_name]


def attach_hook(model: TLModel, hook_name: str, fn: HookFn, *, prepend: bool = False) -> RemovableHandle:
    """Attach a forward hook that may replace the hook point's output.

    A plain torch hook on the HookPoint: TransformerLens's `reset_hooks` (called by
    `run_with_hooks`) does not know it, so a user's TransformerLens hooks inside a splice
    cannot remove ours; we remove it ourselves through the returned handle. On the Bridge a hook
    point may carry a `hook_conversion` (attention's `hook_z`, `hook_q`, ... hold flat heads); `fn`
    sees the converted tensor, as TransformerLens's own hooks do, and its result is reverted.
    """

    return tl_bridge.attach_forward_hook(hook_module(model, hook_name), fn, prepend=prepend)


@contextlib.contextmanager
def hooks(model: TLModel, pairs: Sequence[tuple[str, HookFn]], *, prepend: bool = False) -> Iterator[None]:
    """Forward hooks `(hook_name, fn)` attached for the block (see `attach_hook`) and removed when
    it is left, however it is left: the one place that holds R5 for every caller. Every name is
    checked before the first hook is attached."""
    points = tl_bridge.hook_points(model)  # the Bridge builds its hook_dict anew on every read: kept
    unknown = [name for name, _ in pairs if name not in points]
    if unknown:
        raise KeyError(f"no hook point named {unknown} in the model")
    handles: list[RemovableHandle] = []
    try:
        for name, fn in pairs:
            handles.append(tl_bridge.attach_forward_hook(points[name], fn, prepend=prepend))
        yield
    finally:
        for handle in handles:
            handle.remove()


def canonical_model_name(name: str) -> str:
    """TransformerLens's official name for `name` or any of its aliases ("gpt2-small" -> "gpt2");
    names it does not know are returned as given (the offline default, local folders)."""
    try:
        from transformer_lens.loading_from_pretrained import get_official_model_name
    except ImportError:  # TransformerLens 4 moved the resolver to supported_models
        from transformer_lens.supported_models import get_official_model_name
    try:
        return get_official_model_name(name)
    except ValueError:
        return name


def same_model(a: str, b: str) -> bool:
    """Whether two model names denote the same model, aliases resolved."""
    return a == b or canonical_model_name(a) == canonical_model_name(b)


def to_tokens(model: TLModel, text: str | list[str], *, prepend_bos: bool = True, truncate: bool = False) -> Tensor:
    """Token ids of `text` (a list is right-padded by TransformerLens). A text longer than the
    model's context is refused (`check_context`), never cut as TransformerLens's default does;
    `truncate=True` keeps its first `n_ctx` tokens, for callers that mean to cut."""
    tokens = model.to_tokens(text, prepend_bos=prepend_bos, truncate=truncate)
    if not truncate:
        what = f"the text {text!r:.60}" if isinstance(text, str) else f"the longest of {len(text)} texts"
        check_context(tokens.shape[-1], n_ctx(model), what)
    return tokens


def to_str_tokens(model: TLModel, tokens: Tensor) -> list[str]:
    """String tokens; token ids as text for models without a tokenizer (tiny test models)."""
    if model.tokenizer is None:
        return [str(t) for t in tokens.tolist()]
    return model.to_str_tokens(tokens)


def forward_logits(model: TLModel, tokens: Tensor) -> Tensor:
    return model(tokens, return_type="logits")


def model_dtype(model: TLModel) -> torch.dtype:
    return model.cfg.dtype


def model_device(model: TLModel) -> torch.device:
    return next(model.parameters()).device


def inferred_flags(model: TLModel) -> dict[str, bool | None]:
    """The weight processing of a model not loaded by latentpatch, read off the model itself.

    Folded norms show in its type (`LNPre`, `RMSPre`); centred writing weights as a zero mean over
    `d_model` of every matrix that writes to the residual stream; a centred unembedding as a zero
    mean over the vocabulary. Value-bias folding leaves `b_V` zero, which a model without value
    biases shows too: there folding changes nothing, and the flag reads None (either value holds).
    """
    norm = model.cfg.normalization_type or ""

    def centred(weight: Tensor, dim: int) -> bool:
        weight = weight.detach().float()
        return bool(weight.mean(dim).abs().max() <= 1e-5 * max(weight.abs().max().item(), 1e-12))

    writers = [model.W_E] + [block.attn.W_O for block in model.blocks] + [block.mlp.W_out for block in model.blocks
                                                                           if hasattr(block, "mlp")]
    b_v = [getattr(block.attn, "b_V", None) for block in model.blocks]
    return {
        "fold_ln": norm.endswith("Pre"),
        "center_writing_weights": all(centred(w, -1) for w in writers),
        "center_unembed": centred(model.W_U, -1),
        "fold_value_biases": None if all(b is None or not b.detach().any() for b in b_v) else False,
    }


def d_vocab(model: TLModel) -> int:
    return model.cfg.d_vocab


def run_blocks(model: TLModel, residual: Tensor, start_layer: int, past_kv_cache: Any = None) -> Tensor:
    """Run blocks `start_layer..n_layers-1` on a residual stream; return it before the final norm.

    With `past_kv_cache` the residual holds only the positions after the cached prefix. It is made
    contiguous: a block whose MLP reads its input unnormalized (parallel attention and MLP, no norm)
    hands it to TransformerLens's `batch_addmm`, whose `.view` refuses an expanded tensor. On the
    Bridge its blocks are driven from the layer (`tl_bridge_blocks`)."""
    if tl_bridge.is_bridge(model):
        return tl_bridge_rows.run_blocks(model, residual, start_layer, past_kv_cache)
    return model(residual.contiguous(), start_at_layer=start_layer, stop_at_layer=model.cfg.n_layers, past_kv_cache=past_kv_cache)


def full_rows(model: TLModel) -> bool:
    """Whether patched rows must run whole on `model`, from position 0 and the embedding: on neither
    backend now (the Bridge's blocks run from a layer after a key-value prefix, `tl_bridge_blocks`).
    The one place a caller asks, so that a backend without the shortcuts would need no caller changed."""
    return False


def n_heads(model: TLModel) -> int:
    return model.cfg.n_heads


def run_until_end_with_cache(model: TLModel, tokens: Tensor, hook_names: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """The final residual stream (before the final norm) and the named activations, one forward."""
    if tl_bridge.is_bridge(model):
        return tl_bridge_rows.run_until_end_with_cache(model, tokens, hook_names)
    final, cache = model.run_with_cache(tokens, names_filter=hook_names, stop_at_layer=model.cfg.n_layers)
    return final, {name: cache[name] for name in hook_names}


def to_string(model: TLModel, tokens: Tensor) -> str:
    if model.tokenizer is None:
        return " ".join(str(t) for t in tokens.tolist())
    return model.to_string(tokens)


class _StopForward(Exception):
    """Raised by the harvest hook once it has the activation: nothing later needs to run."""


def run_to_hook(model: TLModel, tokens: Tensor, hook_name: str, layer: int) -> Tensor:
    """The activation at `hook_name` (in block `layer`), running the model no further."""
    return run_to_hooks(model, tokens, [hook_name], layer)[hook_name]


def encode_text(model: TLModel, text: str) -> list[int]:
    """Token ids of `text` with no BOS or other special tokens added."""
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenizer(model: TLModel) -> Any:
    """The model's Hugging Face tokenizer (None for a model built without one), for what only it
    does: chat templates and its special tokens."""
    return model.tokenizer


def single_token_id(model: TLModel, text: str) -> int | None:
    """The id of `text` when it is one token without BOS (as TransformerLens's `to_single_token`
    reads it), else None: the caller names what it needed the token for."""
    ids = to_tokens(model, text, prepend_bos=False)[0]
    return int(ids[0]) if ids.numel() == 1 else None


def bos_token_id(model: TLModel) -> int:
    return model.tokenizer.bos_token_id


def special_token_ids(model: TLModel) -> list[int]:
    """BOS, EOS, padding and every other special token of the model's tokenizer."""
    tokenizer = model.tokenizer
    ids = set(tokenizer.all_special_ids)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, name, None) is not None:
            ids.add(getattr(tokenizer, name))
    return sorted(ids)


def direction_logits(model: TLModel, direction: Tensor) -> Tensor:
    """Direct logit effect of a residual-stream direction, `(d_vocab,)`: through the final norm's
    weight (when it has one, i.e. the norm is not folded) and the unembedding.

    The norm's input-dependent scale is left out, as in the logit lens: the ranking of tokens is
    what this is for. The final logit soft-cap (Gemma 2, `c * tanh(raw / c)`) is applied as the
    model applies it, so the figures are logits the model could output.
    """
    from transformer_lens.utilities import apply_softcap

    weight = getattr(model.ln_final, "w", None) if model.cfg.normalization_type is not None else None
    scaled = direction * weight if weight is not None else direction
    return apply_softcap(scaled.to(model.W_U.dtype) @ model.W_U, model.cfg.output_logits_soft_cap)


def has_tokenizer(model: TLModel) -> bool:
    return model.tokenizer is not None


def pad_token_id(model: TLModel) -> int:
    """The id used to right-pad token rows (0 for models without a tokenizer)."""
    if model.tokenizer is None:
        return 0
    pad = model.tokenizer.pad_token_id
    return pad if pad is not None else model.tokenizer.eos_token_id


def run_to_hooks(model: TLModel, tokens: Tensor, hook_names: list[str], layer: int) -> dict[str, Tensor]:
    """The activations at several hooks within blocks `0..layer`, running the model no further.

    `stop_at_layer=layer + 1` skips every later block, and the last hook to fire aborts the forward
    pass, so even the rest of block `layer` is skipped.
    """
    captured: dict[str, Tensor] = {}

    def capture(name: str) -> HookFn:
        def fn(activation: Tensor) -> None:
            captured[name] = activation.detach()
            if len(captured) == len(hook_names):
                raise _StopForward
        return fn

    try:
        with hooks(model, [(name, capture(name)) for name in hook_names]):
            model(tokens, stop_at_layer=layer + 1)
    except _StopForward:
        pass
    missing = [name for name in hook_names if name not in captured]
    if missing:
        raise RuntimeError(f"hooks {missing} did not fire within the first {layer + 1} blocks")
    return captured


def mlp_input_kind(model: TLModel) -> str:
    """The residual-stream site kind the MLP reads: `resid_pre` with parallel attention (GPT-J,
    GPT-NeoX), else `resid_mid`."""
    return "resid_pre" if model.cfg.parallel_attn_mlp else "resid_mid"


def mlp_pre_affine(model: TLModel, layer: int) -> tuple[Tensor, Tensor, str, float]:
    """`mlp.hook_pre` of block `layer` as an affine map of its norm's normalized input.

    Returns `(W, b, norm, eps)` with `hook_pre = normalized(x) @ W + b`, where `normalized(x)` is
    `center(x) / sqrt(mean(center(x)^2) + eps)`, `center` subtracts the mean for LayerNorm kinds
    and is the identity for RMSNorm kinds (`norm` is "ln", "rms" or "none"). The norm's weight is
    folded into `W` and its bias into `b`. For a gated MLP `hook_pre` is the gate's pre-activation
    (`W_gate`, no bias); otherwise `W_in` and `b_in`.
    """
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    cfg, block = model.cfg, model.blocks[layer]
    if cfg.attn_only or cfg.original_architecture in POST_NORM_ARCHITECTURES:
        raise ValueError(f"block {layer} has no pre-norm MLP reading the residual stream "
                         f"(attn_only={cfg.attn_only}, architecture={cfg.original_architecture})")
    mlp = block.mlp
    weight = (mlp.W_gate if cfg.gated_mlp else mlp.W_in).detach()  # (d_model, d_mlp)
    bias = torch.zeros(weight.shape[1], dtype=weight.dtype) if cfg.gated_mlp else mlp.b_in.detach().clone()
    kind = cfg.normalization_type
    norm = {"LN": "ln", "LNPre": "ln", "RMS": "rms", "RMSPre": "rms", None: "none"}[kind]
    if kind in ("LN", "RMS"):
        weight = block.ln2.w.detach()[:, None] * weight
    if kind == "LN":
        bias = bias + block.ln2.b.detach() @ (mlp.W_gate if cfg.gated_mlp else mlp.W_in).detach()
    return weight, bias, norm, float(cfg.eps)


def mlp_out_weight(model: TLModel, layer: int) -> Tensor:
    """`W_out` of block `layer`, `(d_mlp, d_model)`: row n is what neuron n writes to the residual stream."""
    return model.blocks[layer].mlp.W_out.detach()


def d_head(model: TLModel) -> int:
    return model.cfg.d_head


def n_ctx(model: TLModel) -> int:
    return model.cfg.n_ctx


def n_kv_heads(model: TLModel) -> int:
    """Heads of `hook_k` / `hook_v`: the key/value heads under grouped-query attention, unless
    TransformerLens was asked to ungroup them."""
    cfg = model.cfg
    if cfg.n_key_value_heads is None or cfg.ungroup_grouped_query_attention:
        return cfg.n_heads
    return cfg.n_key_value_heads


def head_out_weight(model: TLModel, layer: int) -> Tensor:
    """`W_O` of block `layer`, `(n_heads, d_head, d_model)`: a head's write is `z[head] @ W_O[head]`."""
    return model.blocks[layer].attn.W_O.detach()


def token_embeddings(model: TLModel, tokens: Tensor) -> Tensor:
    """`W_E[tokens]`: the token embeddings, before any positional embedding."""
    return model.W_E.detach()[tokens]


# Building models, and generation with key-value caches, live in their own modules (this one stays
# small); re-exported here so that callers keep one door to TransformerLens.
from patching.model.tl_loading import build_from_local_folder, load_official, transpose_layout  # noqa: E402, F401
from patching.model.tl_generation import (  # noqa: E402, F401
    attach_block_pre_hook, bound_prefix, cache_before, cache_length, expand_cache, forward_step, generate, left_padded_tokens, new_kv_cache,
    prefix_cache, run_blocks_joining, run_until_end_with_keys_values, sample_logits, seeded_generator, select_cache_rows,
    slice_cache,
)
