"""Seeded fuzz test of `load_sae` (issue 17): every mutated folder either raises `SAEFileError`
naming a file in it, or loads an SAE whose encode/decode outputs equal the original's.

Mutations: byte flips, truncation and appended bytes in either file; header JSON edits; cfg.json
values replaced by values of another type, keys dropped, unknown or duplicated. The SHA-256 in a
latentpatch file covers the weights file only, so byte flips in the data section are fuzzed on
files that carry it; a SAELens-style file (no hash) gets header-only flips. A type-valid new value
for a key that defines the function (`k=1`, `apply_b_dec_to_input=false`) is a different SAE, not
a corrupt one, and is not generated.
"""

from __future__ import annotations

import json
import random
import shutil
import struct

import pytest
import torch

from sae import SAEFileError, load_sae
from sae.cfg_schema import PROVENANCE_KEYS, TOP_LEVEL_KEYS
from sae.files import CONFIG_FILE, WEIGHTS_FILE
from tests.conftest import make_sae

SEED = 17
CASES = 400
PROBES = [None, True, False, 0, -1, 3, 1.5, 2**70, "", "x", "false", "float64", [], [1], [None, "a"], {}, {"a": 1}]
FUNCTION_KEYS = {"d_in", "d_sae", "dtype", "apply_b_dec_to_input", "architecture", "k", "activation_fn",
                 "activation_fn_str", "activation_fn_kwargs"}


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """(folder, SAE, carries our hash) for three architectures; jumprelu is saved SAELens-style."""
    root = tmp_path_factory.mktemp("fuzz")
    out = []
    for architecture, k in (("standard", None), ("topk", 3), ("jumprelu", None)):
        sae = make_sae(8, 16, hook_name="blocks.1.hook_resid_pre", model_name="m", architecture=architecture, k=k)
        folder = sae.save(root / architecture)
        hashed = architecture != "jumprelu"
        if not hashed:
            cfg = json.loads((folder / CONFIG_FILE).read_text())
            del cfg["metadata"]["latentpatch"]
            (folder / CONFIG_FILE).write_text(json.dumps(cfg))
        out.append((folder, sae, hashed))
    return out


def _header_len(blob: bytes) -> int:
    return 8 + struct.unpack("<Q", blob[:8])[0]


def _flip(rng: random.Random, blob: bytes, stop: int) -> bytes:
    data = bytearray(blob)
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(stop)] ^= rng.randint(1, 255)
    return bytes(data)


def _mutate_header(rng: random.Random, blob: bytes) -> bytes:
    n = _header_len(blob)
    header = json.loads(blob[8:n])
    names = [k for k in header if k != "__metadata__"]
    name, op = rng.choice(names), rng.randrange(5)
    if op == 0:
        header[name][rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(PROBES + ["F16", "I32", "F64"])
    elif op == 1:
        header[name]["data_offsets"] = [o + rng.choice([-4, 4]) for o in header[name]["data_offsets"]]
    elif op == 2:
        header[name]["shape"] = list(reversed(header[name]["shape"])) + rng.choice([[], [1]])
    elif op == 3:
        header[name + rng.choice(["", "_x"])] = header.pop(name) if rng.random() < 0.5 else rng.choice(PROBES)
    else:
        header["__metadata__"] = rng.choice(PROBES)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + blob[n:]


def _mutate_cfg(rng: random.Random, text: bytes) -> bytes:
    cfg = json.loads(text)
    op = rng.randrange(4)
    holder = cfg["metadata"] if rng.random() < 0.5 else cfg
    if op == 0:  # a value of another type
        key = rng.choice(sorted(holder))
        rule = TOP_LEVEL_KEYS.get(key) or PROVENANCE_KEYS.get(key)
        allowed = [p for p in PROBES if not (key in FUNCTION_KEYS and rule is not None and rule.check(p))]
        holder[key] = rng.choice(allowed)
    elif op == 1 and holder:
        holder.pop(rng.choice(sorted(holder)))
    elif op == 2:
        holder[rng.choice(["surprise", "hook_layer", "latentpatch", "seqpos_slice"])] = rng.choice(PROBES)
    else:  # the same key twice, which json.dumps cannot write
        key = rng.choice(sorted(cfg))
        return json.dumps(cfg)[:-1].encode() + f', "{key}": {json.dumps(cfg[key])}}}'.encode()
    return json.dumps(cfg).encode()


def _mutate(rng: random.Random, cfg: bytes, weights: bytes, hashed: bool) -> tuple[str, bytes, bytes]:
    kind = rng.choice(["flip", "header", "cfg", "truncate", "append"])
    if kind == "flip":
        return kind, cfg, _flip(rng, weights, len(weights) if hashed else _header_len(weights))
    if kind == "header":
        return kind, cfg, _mutate_header(rng, weights)
    if kind == "cfg":
        return kind, _mutate_cfg(rng, cfg), weights
    which = rng.random() < 0.5
    if kind == "truncate":
        cut = lambda b: b[: rng.randrange(len(b))]  # noqa: E731
        return kind, cut(cfg) if which else cfg, weights if which else cut(weights)
    extra = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return kind, cfg + extra if which else cfg, weights if which else weights + extra


def test_fuzzed_folders_raise_sae_file_error_or_load_identically(originals, tmp_path):
    rng, x = random.Random(SEED), torch.randn(6, 8, generator=torch.Generator().manual_seed(SEED))
    failures, outcomes = [], {"refused": 0, "loaded": 0}
    for case in range(CASES):
        source, sae, hashed = originals[case % len(originals)]
        original = (source / CONFIG_FILE).read_bytes(), (source / WEIGHTS_FILE).read_bytes()
        kind, cfg, weights = _mutate(rng, *original, hashed)
        folder = tmp_path / f"case{case}"
        folder.mkdir()
        (folder / CONFIG_FILE).write_bytes(cfg)
        (folder / WEIGHTS_FILE).write_bytes(weights)
        try:
            loaded = load_sae(folder)
        except SAEFileError as err:
            outcomes["refused"] += 1
            if err.path.parent != folder or str(folder) not in str(err):
                failures.append(f"case {case} ({kind}): error does not name the file: {err}")
        except Exception as err:  # anything else is the defect this test exists to find
            failures.append(f"case {case} ({kind}): {type(err).__name__}: {err}")
        else:
            outcomes["loaded"] += 1
            z = sae.encode(x)
            if not (torch.equal(loaded.encode(x), z) and torch.equal(loaded.decode(z), sae.decode(z))):
                failures.append(f"case {case} ({kind}): loaded with different outputs")
        shutil.rmtree(folder)
    assert failures == [], "\n".join(failures[:20])
    # Both outcomes must occur, or the mutations are too mild or too wild to test anything.
    assert outcomes["refused"] > CASES // 2 and outcomes["loaded"] > 10, outcomes
