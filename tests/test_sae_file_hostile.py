"""Regression tests for the hostile-file cases of issues 16 and 17: each one crashed, hung, read
too much or was silently accepted before; each must now raise `SAEFileError` naming the file and key."""

from __future__ import annotations

import json
import math
import os
import signal
import struct
from pathlib import Path

import pytest
import torch

from sae import SAEFileError, load_sae
from sae.cfg_schema import LATENTPATCH_KEYS, PROVENANCE_KEYS, TOP_LEVEL_KEYS
from sae.files import CONFIG_FILE, WEIGHTS_FILE
from tests.conftest import make_sae


@pytest.fixture()
def folder(tmp_path):
    sae = make_sae(8, 16, hook_name="blocks.2.hook_resid_pre", model_name="tiny", architecture="topk", k=3)
    return sae.save(tmp_path / "sae")


@pytest.fixture()
def no_hang():
    """A FIFO would block the old loader forever: fail after 10 s instead of hanging the suite."""

    def timeout(*_):
        raise TimeoutError("load_sae blocked")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def refused(folder: Path, *words: str, file: str = CONFIG_FILE) -> str:
    with pytest.raises(SAEFileError) as info:
        load_sae(folder)
    message = str(info.value)
    assert info.value.path == folder / file, message
    for word in words:
        assert word in message, message
    return message


def edit_cfg(folder: Path, change) -> None:
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    change(cfg)
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))


def split_weights(folder: Path) -> tuple[dict, bytes]:
    blob = (folder / WEIGHTS_FILE).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def write_weights(folder: Path, header_text: str, data: bytes) -> None:
    raw = header_text.encode()
    (folder / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    edit_cfg(folder, lambda cfg: cfg["metadata"].pop("latentpatch"))  # SAELens-style: no hash, structure only


@pytest.mark.parametrize("name", [CONFIG_FILE, WEIGHTS_FILE])
def test_symlink_to_dev_zero_is_refused_unread(folder, name):
    (folder / name).unlink()
    (folder / name).symlink_to("/dev/zero")
    refused(folder, "not a regular file", "character device", file=name)


@pytest.mark.parametrize("name", [CONFIG_FILE, WEIGHTS_FILE])
def test_fifo_is_refused_without_blocking(folder, name, no_hang):
    (folder / name).unlink()
    os.mkfifo(folder / name)
    refused(folder, "not a regular file", "FIFO", file=name)


def test_folder_in_place_of_a_file_is_refused(folder):
    (folder / CONFIG_FILE).unlink()
    (folder / CONFIG_FILE).mkdir()
    refused(folder, "not a regular file", "folder")


def test_oversized_config_is_refused_unread(folder):
    with open(folder / CONFIG_FILE, "r+b") as handle:
        handle.truncate(3 * 2**30)  # sparse: costs no disk
    refused(folder, "more than")


def _bytes_read() -> int:
    lines = Path("/proc/self/io").read_text().splitlines()
    return int(next(line for line in lines if line.startswith("rchar")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts read bytes through Linux /proc/self/io")
def test_sparse_3gib_weights_with_valid_header_are_refused_unread(folder):
    with open(folder / WEIGHTS_FILE, "r+b") as handle:
        handle.truncate(3 * 2**30)  # valid header and data, then 3 GiB of holes
    before = _bytes_read()
    refused(folder, "trailing bytes", file=WEIGHTS_FILE)
    assert _bytes_read() - before < 2**20


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts read bytes through Linux /proc/self/io")
def test_header_declaring_huge_tensors_is_refused_before_the_data(folder):
    header, _ = split_weights(folder)
    header["W_enc"]["shape"] = [2**15, 2**14]  # 2 GiB of F32, contradicting cfg.json's (8, 16)
    end = 0
    for name in sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]):
        length = math.prod(header[name]["shape"]) * 4
        header[name]["data_offsets"] = [end, end + length]
        end += length
    write_weights(folder, json.dumps(header), b"")
    with open(folder / WEIGHTS_FILE, "r+b") as handle:
        handle.seek(0, os.SEEK_END)
        handle.truncate(handle.tell() + end)
    before = _bytes_read()
    refused(folder, "W_enc", "(32768, 16384)", "(8, 16)", file=WEIGHTS_FILE)
    assert _bytes_read() - before < 2**20


@pytest.mark.parametrize("key,change", [
    ("metadata.latentpatch", lambda cfg: cfg["metadata"].update(latentpatch=[1])),
    ("activation_fn_kwargs", lambda cfg: cfg.update(activation_fn_kwargs=[3])),
    ("metadata.model_from_pretrained_kwargs", lambda cfg: cfg["metadata"].update(model_from_pretrained_kwargs="ab")),
    ("apply_b_dec_to_input", lambda cfg: cfg.update(apply_b_dec_to_input="false")),
    ("metadata.latentpatch.weights_sha256", lambda cfg: cfg["metadata"]["latentpatch"].update(weights_sha256=5)),
    ("metadata.latentpatch.weights_sha256", lambda cfg: cfg["metadata"]["latentpatch"].update(weights_sha256=None)),
    ("metadata.latentpatch.weights_sha256", lambda cfg: cfg["metadata"]["latentpatch"].update(weights_sha256="ab")),
    ("metadata.context_size", lambda cfg: cfg["metadata"].update(context_size="abc")),
    ("metadata.prepend_bos", lambda cfg: cfg["metadata"].update(prepend_bos="no")),
    ("k", lambda cfg: cfg.update(k=True)),
    ("d_in", lambda cfg: cfg.update(d_in=8.0)),
    ("activation_fn_kwargs.k", lambda cfg: cfg.update(activation_fn="topk", architecture="standard",
                                                      activation_fn_kwargs={"k": "3"})),
])
def test_wrongly_typed_config_value_is_refused_naming_the_key(folder, key, change):
    edit_cfg(folder, change)
    refused(folder, repr(key))


def test_missing_hash_in_our_section_is_refused(folder):
    """A latentpatch-written file always carries its hash; without one it must not load unverified."""
    edit_cfg(folder, lambda cfg: cfg["metadata"]["latentpatch"].pop("weights_sha256"))
    refused(folder, "'metadata.latentpatch'", "weights_sha256")


def test_saelens_file_without_our_section_loads_unverified(folder):
    """SAELens writes no hash: such a file is read, checked for structure, shapes and finiteness only."""
    edit_cfg(folder, lambda cfg: cfg["metadata"].pop("latentpatch"))
    assert load_sae(folder).cfg.k == 3


@pytest.mark.parametrize("text", ['{"d_in": 8, "d_in": 8, "d_sae": 16}',
                                  '{"d_in": 8, "d_sae": 16, "metadata": {"a": 1, "a": 2}}'])
def test_duplicate_config_keys_are_refused(folder, text):
    (folder / CONFIG_FILE).write_text(text)
    refused(folder, "appears twice")


@pytest.mark.parametrize("where,expected", [("top", "top level"), ("metadata", "'metadata'")])
def test_deeply_nested_config_is_refused(folder, where, expected):
    deep = "[" * 100_000 + "]" * 100_000
    text = deep if where == "top" else '{"d_in": 8, "d_sae": 16, "metadata": {"x": ' + deep + "}}"
    (folder / CONFIG_FILE).write_text(text)
    refused(folder, "nests deeper", expected)


def test_header_dtype_of_wrong_type_is_refused(folder):
    header, data = split_weights(folder)
    header["W_enc"]["dtype"] = ["F32"]
    write_weights(folder, json.dumps(header), data)
    refused(folder, "'W_enc'", "'dtype'", file=WEIGHTS_FILE)


def test_header_with_duplicate_or_deep_keys_is_refused(folder):
    header, data = split_weights(folder)
    text = json.dumps(header)
    write_weights(folder, text[:-1] + ', "b_dec": ' + json.dumps(header["b_dec"]) + "}", data)
    refused(folder, "'b_dec' appears twice", file=WEIGHTS_FILE)
    deep = "[" * 100_000 + "]" * 100_000
    (folder / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(deep)) + deep.encode())
    refused(folder, "nests deeper", file=WEIGHTS_FILE)


def test_every_schema_key_has_a_rule_that_refuses_something():
    """The schema table is the single source: each rule rejects at least one JSON value."""
    probes = ["x", 1, -1, 1.5, True, None, [1], {"a": 1}]
    for table in (TOP_LEVEL_KEYS, PROVENANCE_KEYS, LATENTPATCH_KEYS):
        for key, rule in table.items():
            assert not all(rule.check(v) for v in probes), key
            assert any(rule.check(v) for v in probes + ["0" * 64, [None, 3]]), key


def test_outputs_survive_the_stricter_loader(folder, tmp_path):
    sae = load_sae(folder)
    again = load_sae(sae.save(tmp_path / "again"))
    x = torch.randn(4, 8)
    assert torch.equal(again.encode(x), sae.encode(x))
