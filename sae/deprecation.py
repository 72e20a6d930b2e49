"""Old public names kept working for one release, each use warning with a `DeprecationWarning` that
names the replacement (issue 25: one name per concept; users may already depend on the old ones).

In the lowest package so every package can use it: a renamed keyword (`renamed_keywords`), a config
once passed positionally (`positional_config`), a renamed module attribute (`renamed_attributes`,
for a module's `__getattr__`, PEP 562) and a renamed field of a frozen config (`renamed_fields`).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def warn_deprecated(old: str, new: str, *, stacklevel: int = 3) -> None:
    """One wording for every deprecation, so a user can grep for it."""
    warnings.warn(f"{old} is deprecated and will be removed in the next release; use {new}",
                  DeprecationWarning, stacklevel=stacklevel)


def renamed_keywords(**renames: str) -> Callable[[F], F]:
    """`@renamed_keywords(top_k="k")`: a call with `top_k=` warns and runs as `k=`; both at once is a
    `TypeError` (which value was meant cannot be told)."""
    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__name__}() got both {old}= (deprecated) and {new}=; pass only {new}=")
                    warn_deprecated(f"{fn.__name__}({old}=...)", f"{new}=")
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)
        return wrapper  # type: ignore[return-value]
    return decorate


def positional_config(fn: F) -> F:
    """Accept, with a warning, a config passed as the positional argument after the last positional
    parameter of `fn` (the old style), where the convention is keyword-only `config=`."""
    n_positional = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                       for p in inspect.signature(fn).parameters.values())

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if len(args) == n_positional + 1:
            if "config" in kwargs:
                raise TypeError(f"{fn.__name__}() got a config both positionally and as config=")
            warn_deprecated(f"passing the config of {fn.__name__}() positionally", "config=")
            kwargs["config"] = args[-1]
            args = args[:-1]
        return fn(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


def renamed_attributes(module: str, renames: dict[str, Callable[[], Any]]) -> Callable[[str], Any]:
    """A module `__getattr__` serving each old name (`renames[old]()` gives the new object; its
    `__name__` is the new name) with a warning; any other name is an `AttributeError`."""
    def __getattr__(name: str) -> Any:
        if name not in renames:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        value = renames[name]()
        warn_deprecated(f"{module}.{name}", f"{module}.{getattr(value, '__name__', name)}")
        return value
    return __getattr__


def renamed_fields(**renames: str) -> Callable[[type], type]:
    """`@renamed_fields(n_top="k")` above `@dataclass(frozen=True)`: `Config(n_top=5)` warns and builds
    `Config(k=5)`, and reading `config.n_top` warns and gives `config.k`. The old name is no field, so
    `dataclasses.replace(config, k=3)`, `fields` and `asdict` see only the new one (an alias kept as
    a field or `InitVar` is read back by `replace` and would undo the change). The old keyword wins
    over the new one when both are given: `replace(config, n_top=5)` passes every field too."""
    def decorate(cls: type) -> type:
        init = getattr(cls, "__init__")

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            for old, new in renames.items():
                if old in kwargs:
                    warn_deprecated(f"{cls.__name__}({old}=...)", f"{new}=")
                    kwargs[new] = kwargs.pop(old)
            init(self, *args, **kwargs)

        setattr(cls, "__init__", __init__)
        for old, new in renames.items():
            def read(self: Any, old: str = old, new: str = new) -> Any:
                warn_deprecated(f"{cls.__name__}.{old}", f"{cls.__name__}.{new}")
                return getattr(self, new)
            setattr(cls, old, property(read, doc=f"Deprecated name of `{new}`."))
        return cls
    return decorate
