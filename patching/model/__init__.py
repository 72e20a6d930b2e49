"""The model room: the only place that touches TransformerLens (`tl_compat`), loading models
(the offline default and official names), hook `Site`s, and tokenising texts into padded batches.

Imports nothing of `patching` but the base modules (`errors`, `figures`)."""

from patching.model.loading import DEFAULT_MODEL, ModelFlags, ModelOrigin, cache_root, load_model, load_model_for, model_flags
from patching.model.provenance import library_version, provenance
from patching.model.sites import Site, as_site
from patching.model.tokens import padded_tokens

__all__ = ["DEFAULT_MODEL", "ModelFlags", "ModelOrigin", "Site", "as_site", "cache_root", "library_version", "load_model", "load_model_for", "model_flags", "padded_tokens", "provenance"]
