"""The one place that says what `cfg.json` may hold: strict JSON, and the type of every key.

SAELens 6.x configs keep the shape and activation at the top level (`TOP_LEVEL_KEYS`) and
provenance under `metadata`; flat pre-6.0 configs keep provenance at the top level too
(`PROVENANCE_KEYS`, valid in both places). `metadata` may carry other keys, which SAELens treats
as free-form and we keep for round trips. Our own section, `metadata.latentpatch`, is checked
against `LATENTPATCH_KEYS`. Every violation raises `SAEFileError` naming the file and the key.
"""

from __future__ import annotations

import json
import re
import reprlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from sae.errors import SAEFileError

MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects accepted (SAELens configs use 3); deeper input is refused
before parsing, so a hostile file cannot exhaust the recursion limit."""
FORMAT_VERSION = 1
"""Version of the `metadata.latentpatch` section; files from a newer version are refused."""


class KeyRule(NamedTuple):
    """What one config key must hold."""

    expected: str
    """The type in words, for the error message."""
    check: Callable[[Any], bool]
    """True when a value is acceptable."""


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return _int(value) and value > 0


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _is(*types: type) -> Callable[[Any], bool]:
    # bool is an int subclass: `_is(int)` must not take True.
    return lambda value: isinstance(value, types) and (bool in types or not isinstance(value, bool))


def _str_keyed_object(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(key, str) for key in value)


def _sha256_hex(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


TOP_LEVEL_KEYS: dict[str, KeyRule] = {
    "d_in": KeyRule("a positive int", _positive_int),
    "d_sae": KeyRule("a positive int", _positive_int),
    "dtype": KeyRule("a string", _is(str)),
    "device": KeyRule("a string", _is(str)),
    "apply_b_dec_to_input": KeyRule("true or false", _is(bool)),
    # Pre-6.0 files wrote false or null for "none".
    "normalize_activations": KeyRule("a string, false or null",
                                     lambda v: v is None or v is False or isinstance(v, str)),
    "reshape_activations": KeyRule("a string", _is(str)),
    "metadata": KeyRule("an object", _str_keyed_object),
    "architecture": KeyRule("a string", _is(str)),
    "k": KeyRule("a positive int", _positive_int),
    "rescale_acts_by_decoder_norm": KeyRule("true or false", _is(bool)),
}
PROVENANCE_KEYS: dict[str, KeyRule] = {
    "model_name": KeyRule("a string or null", _optional(_is(str))),
    "hook_name": KeyRule("a string or null", _optional(_is(str))),
    "hook_point": KeyRule("a string or null", _optional(_is(str))),
    "hook_layer": KeyRule("an int or null", _optional(_int)),
    "hook_point_layer": KeyRule("an int or null", _optional(_int)),
    "hook_head_index": KeyRule("an int or null", _optional(_int)),
    "hook_point_head_index": KeyRule("an int or null", _optional(_int)),
    "activation_fn": KeyRule("a string or null", _optional(_is(str))),
    "activation_fn_str": KeyRule("a string or null", _optional(_is(str))),
    "activation_fn_kwargs": KeyRule("an object or null", _optional(_str_keyed_object)),
    "finetuning_scaling_factor": KeyRule("true, false or null", _optional(_is(bool))),
    "context_size": KeyRule("a positive int or null", _optional(_positive_int)),
    "dataset_path": KeyRule("a string or null", _optional(_is(str))),
    "dataset_trust_remote_code": KeyRule("true, false or null", _optional(_is(bool))),
    "prepend_bos": KeyRule("true, false or null", _optional(_is(bool))),
    "sae_lens_version": KeyRule("a string or null", _optional(_is(str))),
    "sae_lens_training_version": KeyRule("a string or null", _optional(_is(str))),
    "model_from_pretrained_kwargs": KeyRule("an object or null", _optional(_str_keyed_object)),
    "seqpos_slice": KeyRule("an array of ints or nulls, or null",
                            _optional(lambda v: isinstance(v, list) and all(x is None or _int(x) for x in v))),
    "neuronpedia_id": KeyRule("a string or null", _optional(_is(str))),
    "exclude_special_tokens": KeyRule(
        "true, false, an array of ints or null",
        _optional(lambda v: isinstance(v, bool) or (isinstance(v, list) and all(map(_int, v))))),
    "model_class_name": KeyRule("a string or null", _optional(_is(str))),
}
LATENTPATCH_KEYS: dict[str, KeyRule] = {
    "format_version": KeyRule(f"an int from 1 to {FORMAT_VERSION}", lambda v: _int(v) and 1 <= v <= FORMAT_VERSION),
    "weights_sha256": KeyRule("64 lowercase hex digits", _sha256_hex),
}
REQUIRED_KEYS = ("d_in", "d_sae")
ACTIVATION_K = KeyRule("a positive int", _positive_int)
"""`activation_fn_kwargs.k` of a pre-6.0 topk config."""


def check_config(raw: dict[str, Any], path: Path) -> str | None:
    """Refuse unknown or missing top-level keys and any value of the wrong type; return the weights hash.

    The hash is None exactly when `metadata` has no `latentpatch` section (a SAELens-written file).
    """
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS) - set(PROVENANCE_KEYS))
    if unknown:
        raise SAEFileError(path, f"unknown config keys {unknown}")
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise SAEFileError(path, f"missing config keys {missing}")
    for key, value in raw.items():
        _check_key(key, value, TOP_LEVEL_KEYS.get(key) or PROVENANCE_KEYS[key], path)
    metadata = raw.get("metadata", {})
    sha = check_latentpatch_section(metadata["latentpatch"], path) if "latentpatch" in metadata else None
    for key, value in metadata.items():
        if key in PROVENANCE_KEYS:
            _check_key(f"metadata.{key}", value, PROVENANCE_KEYS[key], path)
    for holder, prefix in ((raw, ""), (raw.get("metadata", {}), "metadata.")):
        kwargs = holder.get("activation_fn_kwargs") or {}
        if "k" in kwargs:
            _check_key(f"{prefix}activation_fn_kwargs.k", kwargs["k"], ACTIVATION_K, path)
    return sha


def check_latentpatch_section(section: Any, path: Path) -> str:
    """Validate `metadata.latentpatch` (written by `save_sae`) and return its weights hash.

    A file we wrote always carries the hash, so a section without one, or with a non-string
    one, is refused rather than read unverified.
    """
    _check_key("metadata.latentpatch", section, KeyRule("an object", _str_keyed_object), path)
    version = section.get("format_version")
    if _int(version) and version > FORMAT_VERSION:
        raise SAEFileError(path, f"key 'metadata.latentpatch.format_version': format {version} is newer than the "
                           f"supported {FORMAT_VERSION}; upgrade latentpatch")
    unknown = sorted(set(section) - set(LATENTPATCH_KEYS))
    missing = sorted(set(LATENTPATCH_KEYS) - set(section))
    if unknown or missing:
        raise SAEFileError(path, f"key 'metadata.latentpatch': unknown keys {unknown}, missing keys {missing}")
    for key, rule in LATENTPATCH_KEYS.items():
        _check_key(f"metadata.latentpatch.{key}", section[key], rule, path)
    return section["weights_sha256"]


def _check_key(key: str, value: Any, rule: KeyRule, path: Path) -> None:
    if not rule.check(value):
        raise SAEFileError(path, f"key {key!r} must be {rule.expected}, found {type(value).__name__} {_short(value)}")


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 40, 40


def _short(value: Any) -> str:
    return _REPR.repr(value)


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def strict_json(text: bytes, path: Path, what: str) -> Any:
    """Parse UTF-8 JSON refusing NaN/Infinity, duplicate keys and nesting deeper than `MAX_JSON_DEPTH`.

    `what` names the part of the file in messages (e.g. "cfg.json", "safetensors header").
    """
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SAEFileError(path, f"{what} is not valid UTF-8 ({err})") from err
    _check_depth(decoded, path, what)

    def refuse_constant(name: str) -> Any:
        raise SAEFileError(path, f"{what}: non-standard JSON constant {name} (strict JSON only)")

    def refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise SAEFileError(path, f"{what}: key {key!r} appears twice (JSON keys must be unique)")
            out[key] = value
        return out

    try:
        return json.loads(decoded, parse_constant=refuse_constant, object_pairs_hook=refuse_duplicates)
    except (json.JSONDecodeError, RecursionError) as err:
        raise SAEFileError(path, f"{what} is not valid JSON ({err})") from err


def _check_depth(text: str, path: Path, what: str) -> None:
    """Count bracket depth outside strings; name the top-level key whose value nests too deep."""
    depth, key, last_string, outer = 0, None, None, ""
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token.startswith('"'):
            last_string = token
            continue
        if depth == 0:
            outer = token
        elif depth == 1 and outer == "{" and last_string is not None:
            key = last_string[1:-1]  # in an object, the last string before a bracket at depth 1 is its key
        depth += 1 if token in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            where = f"key {key!r}" if key is not None else "the top level"
            raise SAEFileError(path, f"{what}: {where} nests deeper than {MAX_JSON_DEPTH} levels")
        if depth == 1:
            last_string = None
