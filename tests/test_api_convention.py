"""The public API's one convention (issue 25, section 1): one base exception, one public namespace
(`import latentpatch`), every public name exported once, old names warning, one result contract."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

from sae.errors import LatentpatchError

PACKAGES = ("sae", "patching", "training")
# An interruption is not an error: it stays a bare KeyboardInterrupt so `except Exception` can't swallow it.
NOT_ERRORS = {"TrainingInterrupted"}


def all_modules(package: str) -> list:
    """`package` and every module below it, imported (the command-line modules included)."""
    root = importlib.import_module(package)
    names = [info.name for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}.")]
    return [root] + [importlib.import_module(name) for name in names]


def public_exception_classes() -> dict[str, type]:
    """Every public exception class defined in sae, patching or training, by class name."""
    found = {}
    for package in PACKAGES:
        for module in all_modules(package):
            for name, obj in vars(module).items():
                if (inspect.isclass(obj) and issubclass(obj, BaseException) and not name.startswith("_")
                        and obj.__module__.split(".")[0] in PACKAGES):
                    assert found.setdefault(name, obj) is obj, f"two exception classes named {name}"
    return found


def test_every_typed_error_derives_from_latentpatch_error():
    classes = public_exception_classes()
    # the scan sees the errors of all three packages, the registry's and the corpora's included
    assert {"SAEFileError", "UnknownReleaseError", "SteeringError", "CheckpointError",
            "CorpusIntegrityError"} <= set(classes)
    offenders = sorted(name for name, cls in classes.items()
                       if name not in NOT_ERRORS and not issubclass(cls, LatentpatchError))
    assert offenders == []


def test_errors_keep_their_builtin_bases():
    """Code that caught the built-in (ValueError, LookupError, ...) still catches the typed error."""
    from patching.errors import ModelLoadError, PatchingError
    from sae.errors import NotAnSAEError
    from sae.registry import UnknownReleaseError
    from training.errors import NonFiniteError, TrainingInterrupted

    assert issubclass(PatchingError, ValueError) and issubclass(ModelLoadError, RuntimeError)
    assert issubclass(NotAnSAEError, TypeError) and issubclass(UnknownReleaseError, LookupError)
    assert issubclass(NonFiniteError, FloatingPointError)
    assert issubclass(TrainingInterrupted, KeyboardInterrupt) and not issubclass(TrainingInterrupted, Exception)


def test_a_raised_error_is_caught_as_latentpatch_error(tiny_model):
    from patching import Site

    with pytest.raises(LatentpatchError, match="out of range"):
        Site(layer=99, kind="resid_pre").check(tiny_model)
