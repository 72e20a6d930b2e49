"""The result contract (issue 25, section 1; RELIABILITY.md R3, R15): every result type has
`save(folder)`, a matching classmethod `load(folder)`, `plot(path)` and `to_dataframe()`, and
carries one provenance record (`patching.model.provenance.provenance`).

`SavedResult` gives a dataclass result the files: `result.json` (strict JSON: the type, a format
version and every field) beside `tensors.safetensors` (every tensor field), and the plot, written
into a temporary folder and swapped in whole (`sae.atomic.atomic_folder`). Loading reads with size
guards, runs no code and builds only dataclasses defined in latentpatch's own packages.

A base module below every room, like `errors`: it imports no room.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from pathlib import Path
from typing import Any

from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from patching.errors import PatchingError
from sae.atomic import atomic_folder
from sae.safe_io import read_bytes, read_text

RESULT_FILE = "result.json"
TENSORS_FILE = "tensors.safetensors"
PLOT_FILE = "plot.png"
FORMAT_VERSION = 1
MAX_RESULT_BYTES = 256 * 1024 * 1024
OUR_PACKAGES = ("sae.", "patching.", "training.")


class SavedResult:
    """Mixin for dataclass results: `save`/`load` from the dataclass fields. Subclasses define
    `to_dataframe()` and `plot(path)`, and override `to_state`/`from_state` where a field needs
    more than the generic encoding (tensors, dataclasses, tuples, lists, str-keyed dicts)."""

    def to_state(self) -> dict[str, Any]:
        """The fields to save, by name (default: every dataclass field)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Any:
        return cls(**state)

    def save(self, folder: str | Path) -> Path:
        """Write `result.json`, `tensors.safetensors` and the plot as one unit; returns the folder."""
        tensors: dict[str, Tensor] = {}
        body = {"format_version": FORMAT_VERSION, "type": class_name(type(self)),
                "state": encode(self.to_state(), tensors, "state")}
        with atomic_folder(folder, owned=(RESULT_FILE, TENSORS_FILE, PLOT_FILE)) as tmp:
            (tmp / TENSORS_FILE).write_bytes(save_safetensors_bytes(tensors))
            (tmp / RESULT_FILE).write_bytes(json.dumps(body, indent=1, allow_nan=False).encode())
            self.plot(tmp / PLOT_FILE)
        return Path(folder)

    @classmethod
    def load(cls, folder: str | Path) -> Any:
        """The result `save` wrote; a folder of another type, a newer format or a broken file is a
        `PatchingError` naming the folder."""
        folder = Path(folder)
        try:
            body = json.loads(read_text(folder / RESULT_FILE, max_bytes=MAX_RESULT_BYTES))
            tensors = load_safetensors_bytes(read_bytes(folder / TENSORS_FILE, max_bytes=MAX_RESULT_BYTES))
        except (OSError, ValueError) as err:
            raise PatchingError(f"{folder}: not a readable saved result ({err})") from err
        if body.get("type") != class_name(cls):
            raise PatchingError(f"{folder}: holds a {body.get('type')!r}, not a {class_name(cls)}")
        if body.get("format_version", 0) > FORMAT_VERSION:
            raise PatchingError(f"{folder}: result format {body['format_version']} is newer than {FORMAT_VERSION}")
        return cls.from_state(decode(body["state"], tensors, folder))


def class_name(cls: type) -> str:
    """`module:qualname`, how a saved file names its type."""
    return f"{cls.__module__}:{cls.__qualname__}"


def encode(value: Any, tensors: dict[str, Tensor], path: str) -> Any:
    """`value` as strict JSON; tensors go to `tensors` under their path in the state. Non-finite floats,
    tuples, dicts with other keys than strings and dataclasses are tagged so `decode` rebuilds them."""
    if isinstance(value, Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, SavedResult):
        return {"__result__": class_name(type(value)), "state": encode(value.to_state(), tensors, path)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.init}
        return {"__dataclass__": class_name(type(value)), "fields": encode(fields, tensors, path)}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: encode(v, tensors, f"{path}.{k}") for k, v in value.items()}}
    if isinstance(value, dict):
        return {"__items__": [[encode(k, tensors, f"{path}.key{i}"), encode(v, tensors, f"{path}.value{i}")]
                              for i, (k, v) in enumerate(value.items())]}
    raise PatchingError(f"cannot save {path}: {type(value).__name__} is not a tensor, number, string, dataclass, "
                        "tuple, list or dict")


def decode(value: Any, tensors: dict[str, Tensor], folder: Path) -> Any:
    """Inverse of `encode`; classes are only ever dataclasses of latentpatch's own packages."""
    if isinstance(value, list):
        return [decode(v, tensors, folder) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        if value["__tensor__"] not in tensors:
            raise PatchingError(f"{folder}: tensor {value['__tensor__']!r} missing from {TENSORS_FILE}")
        return tensors[value["__tensor__"]]
    if "__float__" in value:
        return float(value["__float__"])
    if "__tuple__" in value:
        return tuple(decode(v, tensors, folder) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: decode(v, tensors, folder) for k, v in value["__dict__"].items()}
    if "__items__" in value:
        return {decode(k, tensors, folder): decode(v, tensors, folder) for k, v in value["__items__"]}
    if "__result__" in value:
        return _our_class(value["__result__"], folder).from_state(decode(value["state"], tensors, folder))
    if "__dataclass__" in value:
        return _our_class(value["__dataclass__"], folder)(**decode(value["fields"], tensors, folder))
    raise PatchingError(f"{folder}: unexpected object in {RESULT_FILE}: keys {sorted(value)}")


def _our_class(name: str, folder: Path) -> type:
    module, _, qualname = name.partition(":")
    if not module.startswith(OUR_PACKAGES) or not qualname or "." in qualname:
        raise PatchingError(f"{folder}: refuses to build {name!r}, not a latentpatch class")
    cls = getattr(importlib.import_module(module), qualname, None)
    if not (isinstance(cls, type) and (dataclasses.is_dataclass(cls) or issubclass(cls, SavedResult))):
        raise PatchingError(f"{folder}: {name!r} is not a latentpatch result or dataclass")
    return cls
