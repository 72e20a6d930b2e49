"""A weights file larger than memory is refused naming the file (issue 30, item 10).

A 4.6 TB sparse weights file consistent with its header and `cfg.json` passed every structural
check and then raised a MemoryError that named no file. The file here is sparse too: its size is
declared, none of its data exists on disk, and none of it may be read.
"""

from __future__ import annotations

import json
import struct

import pytest

from sae import SAEConfig, SAEFileError, load_sae
from sae.files import CONFIG_FILE, WEIGHTS_FILE, config_to_dict, memory_bytes


def test_a_weights_file_beyond_memory_is_refused_before_reading(tmp_path):
    d_in, d_sae = 2 ** 14, 2 ** 22  # two 256 GiB matrices in float32
    assert 3 * 2 * d_in * d_sae * 4 > memory_bytes()
    cfg = config_to_dict(SAEConfig(d_in=d_in, d_sae=d_sae, hook_name="blocks.0.hook_resid_pre", model_name="m"))
    cfg["metadata"].pop("latentpatch")  # SAELens-style: no recorded hash, structure checks only
    folder = tmp_path / "sae"
    folder.mkdir()
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))
    shapes = {"W_enc": [d_in, d_sae], "W_dec": [d_sae, d_in], "b_enc": [d_sae], "b_dec": [d_in]}
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 4 * (shape[0] * (shape[1] if len(shape) > 1 else 1))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    with (folder / WEIGHTS_FILE).open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)  # sparse: nothing of the data is on disk
    with pytest.raises(SAEFileError, match="more than this machine's") as info:
        load_sae(folder)
    assert info.value.path == folder / WEIGHTS_FILE
