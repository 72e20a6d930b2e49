"""One way to pass a config (issue 25, section 1): every experiment takes `*, config=None,
**overrides`, where `config` is its frozen config dataclass (the defaults when None) and each
override replaces one field (`steer(model, sae, choice, coefficient=8.0)`).

A base module below every room, like `errors`: it imports no room.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from patching.errors import PatchingError

C = TypeVar("C")


def resolve_config(cls: type[C], config: C | None, overrides: dict[str, Any], *,
                   error: type[Exception] = PatchingError) -> C:
    """`config` (or `cls()`) with `overrides` applied; a config of another type or an unknown field
    is refused before any work, naming the valid fields. The dataclass's own `__post_init__`
    checks the values."""
    if config is not None and not isinstance(config, cls):
        raise error(f"config must be a {cls.__name__}, got {type(config).__name__}")
    names = {field.name for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise error(f"unknown {cls.__name__} fields {unknown}; valid: {sorted(names)}")
    base = config if config is not None else cls()
    return dataclasses.replace(base, **overrides) if overrides else base  # type: ignore[type-var]
