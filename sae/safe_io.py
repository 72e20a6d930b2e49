"""Guarded reading of files the project did not just write: the one way to open, read or hash them.

A path a user, a release folder or a cache hands us may name anything: a link to `/dev/zero`
(reading never ends, memory grows without bound), a FIFO (the open or the read blocks forever),
a folder, or a file larger than anything the caller can use. `open_regular` refuses all of those
before a byte is read: the path must be, or link to, a regular file (`os.stat` + `S_ISREG`), it
is opened non-blocking and checked again on the open descriptor (a FIFO swapped in after the
check cannot block), and its size, known from `fstat`, is bounded before reading starts.
`read_bytes` and `sha256_file` build on it; hashing streams in blocks, so a large file costs
no memory. The safetensors header (length prefix, JSON, offsets) is validated here too, against
the file's size, before any data is read: the SAE loader and the converted-model cache share it.

Every problem raises `UnsafeFileError` naming the path (a `SAEFileError`, so that the SAE
loaders' callers keep catching it; other rooms catch it as `LatentpatchError`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import stat
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from sae.cfg_schema import strict_json
from sae.errors import SAEFileError

BLOCK_BYTES = 1 << 22
"""Bytes read per step when hashing (4 MiB)."""
MAX_HEADER_BYTES = 100 * 1024 * 1024
"""Largest safetensors header read; a length prefix above it is refused unread."""
SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                        "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
"""Bytes per element of each safetensors dtype (the format's own table)."""


class UnsafeFileError(SAEFileError):
    """A file cannot be read safely: missing, not a regular file (a folder, FIFO, device, socket,
    or a link to one), larger than the reader's bound, or changed while being read."""


@contextlib.contextmanager
def open_regular(path: str | Path, *, max_bytes: int | None = None) -> Iterator[tuple[BinaryIO, int]]:
    """Open `path` only if it is, or links to, a regular file of at most `max_bytes`; yield the
    handle and the file's size.

    Symlinks are followed (the Hugging Face cache links into blobs) but must end at a regular file.
    """
    path = Path(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise UnsafeFileError(path, f"is not a regular file ({file_kind(path)})")
        # O_NONBLOCK: a FIFO swapped in after the check must not block the open.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError as err:
        raise UnsafeFileError(path, "file is missing") from err
    except OSError as err:
        raise UnsafeFileError(path, f"cannot be read ({err})") from err
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFileError(path, f"is not a regular file ({file_kind(path)})")
        if max_bytes is not None and info.st_size > max_bytes:
            raise UnsafeFileError(path, f"is {info.st_size} bytes, more than the {max_bytes} this reader accepts")
        yield handle, info.st_size


def file_kind(path: Path) -> str:
    """What `path` is, in words, for messages ("a FIFO", "a symlink to a character device")."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError:
        return "unreadable"
    kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket", stat.S_ISREG: "a regular file"}
    kind = next((word for test, word in kinds.items() if test(mode)), "not a plain file")
    return f"a symlink to {kind}" if path.is_symlink() else kind


def read_exact(handle: BinaryIO, n: int, path: str | Path) -> bytes:
    """Exactly `n` bytes from `handle`; a file that shrank since its size was read is refused."""
    data = handle.read(n)
    if len(data) != n:
        raise UnsafeFileError(path, f"changed while being read: expected {n} more bytes, got {len(data)}")
    return data


def read_bytes(path: str | Path, *, max_bytes: int) -> bytes:
    """The whole of a regular file of at most `max_bytes` (`open_regular`)."""
    with open_regular(path, max_bytes=max_bytes) as (handle, size):
        return read_exact(handle, size, path)


def read_text(path: str | Path, *, max_bytes: int, encoding: str = "utf-8") -> str:
    """`read_bytes` decoded; bytes that are not `encoding` are refused naming the file."""
    try:
        return read_bytes(path, max_bytes=max_bytes).decode(encoding)
    except UnicodeDecodeError as err:
        raise UnsafeFileError(path, f"is not {encoding} text ({err})") from err


def sha256_file(path: str | Path, *, max_bytes: int | None = None) -> str:
    """SHA-256 of a regular file, streamed in `BLOCK_BYTES` blocks (constant memory)."""
    digest = hashlib.sha256()
    with open_regular(path, max_bytes=max_bytes) as (handle, size):
        left = size
        while left:
            block = read_exact(handle, min(left, BLOCK_BYTES), path)
            digest.update(block)
            left -= len(block)
        if handle.read(1):
            raise UnsafeFileError(path, f"changed while being read: grew past its {size} bytes")
    return digest.hexdigest()


class TensorEntry(NamedTuple):
    """One tensor of a safetensors header."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int


def header_length(first8: bytes, size: int, path: str | Path) -> int:
    """The header length a safetensors file's first 8 bytes give, refused past the file or the bound."""
    (length,) = struct.unpack("<Q", first8)
    if length > MAX_HEADER_BYTES or 8 + length > size:
        raise UnsafeFileError(path, f"header length {length} exceeds the file ({size} bytes): truncated or corrupt")
    return length


def header_entries(head: bytes, size: int, path: str | Path,
                   itemsize: Mapping[str, int] = SAFETENSORS_ITEMSIZE) -> dict[str, TensorEntry]:
    """Validate a safetensors header (`head` = length prefix + JSON) against the file's `size`,
    before any data is read: dtypes in `itemsize`, shapes, contiguous offsets covering the data
    section exactly (a truncated file or trailing bytes are refused)."""
    header = strict_json(head[8:], Path(path), "safetensors header")
    if not isinstance(header, dict):
        raise UnsafeFileError(path, "safetensors header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UnsafeFileError(path, "safetensors header key '__metadata__' must be an object of strings")
    entries = {name: _entry(name, info, path, itemsize) for name, info in header.items()}
    end = 0
    for name, entry in sorted(entries.items(), key=lambda item: item[1].start):
        if entry.start != end or entry.stop - entry.start != math.prod(entry.shape) * itemsize[entry.dtype]:
            raise UnsafeFileError(path, f"tensor {name!r} offsets {entry.start}..{entry.stop} "
                                  "do not match its shape and position")
        end = entry.stop
    data_len = size - len(head)
    if end != data_len:
        raise UnsafeFileError(path, f"data section is {data_len} bytes but tensors cover {end}: "
                              "truncated or trailing bytes")
    return entries


def read_header(path: str | Path, itemsize: Mapping[str, int] = SAFETENSORS_ITEMSIZE) -> dict[str, TensorEntry]:
    """A safetensors file's validated header, reading only the header (`open_regular`)."""
    with open_regular(path) as (handle, size):
        if size < 8:
            raise UnsafeFileError(path, f"truncated: {size} bytes, shorter than the 8-byte header length")
        head = read_exact(handle, 8, path)
        head += read_exact(handle, header_length(head, size, path), path)
    return header_entries(head, size, path, itemsize)


def _entry(name: str, info: Any, path: str | Path, itemsize: Mapping[str, int]) -> TensorEntry:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise UnsafeFileError(path, f"tensor {name!r}: header entry must be an object with dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in itemsize:
        raise UnsafeFileError(path, f"tensor {name!r} key 'dtype' is {dtype!r}; expected one of {sorted(itemsize)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise UnsafeFileError(path, f"tensor {name!r} key 'shape' is invalid: {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise UnsafeFileError(path, f"tensor {name!r} key 'data_offsets' is invalid: {offsets!r}")
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
