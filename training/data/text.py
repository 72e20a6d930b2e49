"""Text sources and their tokenization into fixed-length rows for harvesting.

Texts come from local files (`.txt`: documents separated by blank lines; `.jsonl`: one JSON
object per line with a text field), from a Hugging Face dataset through `datasets` when the
hub is reachable, or from the default corpus (`training.data.generated`). `TokenRows` packs them as
SAELens does: documents are concatenated with a BOS token between them and cut into rows of
`context_size` tokens, each starting with BOS. A long document is tokenized in bounded windows
(`patching.model.tokens.encode_windows`), so memory does not grow with a document's length.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from patching.model import tl_compat
from patching.model.tokens import encode_windows
from training.errors import DataSourceError

log = logging.getLogger(__name__)

TextOpener = Callable[[], Iterator[str]]


def file_texts(path: str | Path, *, text_key: str = "text") -> TextOpener:
    """An opener for the documents of a `.txt` or `.jsonl` file (checked now, read lazily)."""
    path = Path(path)
    if path.is_dir():
        raise DataSourceError(f"text file {path} is a folder; expected a .txt or .jsonl file")
    if not path.is_file():
        raise DataSourceError(f"text file {path} " + ("is not a regular file" if path.exists() else "does not exist"))
    if path.suffix not in (".txt", ".jsonl"):
        raise DataSourceError(f"text file {path} must end in .txt or .jsonl, got {path.suffix!r}")
    check_utf8_text(path)

    def open_txt() -> Iterator[str]:
        block: list[str] = []
        with path.open(encoding="utf-8") as handle:
            for line in _decoded(path, handle):
                if line.strip():
                    block.append(line)
                elif block:
                    yield "".join(block).strip()
                    block = []
        if block:
            yield "".join(block).strip()

    def open_jsonl() -> Iterator[str]:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(_decoded(path, handle), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataSourceError(f"{path}:{number} is not valid JSON ({err})") from err
                if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                    raise DataSourceError(f"{path}:{number} has no string field {text_key!r}")
                yield record[text_key]

    return open_txt if path.suffix == ".txt" else open_jsonl


def check_utf8_text(path: Path, *, chunk_bytes: int = 1 << 20) -> None:
    """Refuse a file that is not UTF-8 text (or holds NUL bytes, as binaries do) now, naming the
    path and the byte offset, rather than as a bare `UnicodeDecodeError` after the model loaded.
    Reads the file once, in chunks."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            if (nul := chunk.find(b"\0")) >= 0:
                raise DataSourceError(f"text file {path} holds a NUL byte at offset {offset + nul}: a binary file, "
                                      "expected UTF-8 text")
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise DataSourceError(f"text file {path} is not UTF-8 text (byte offset {offset + err.start}: "
                                      f"{err.reason})") from err
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        raise DataSourceError(f"text file {path} is not UTF-8 text (it ends inside a character)") from err


def _decoded(path: Path, lines: Iterator[str]) -> Iterator[str]:
    """`lines`, with a decoding error (the file changed since it was checked) naming the path."""
    try:
        yield from lines
    except UnicodeDecodeError as err:
        raise DataSourceError(f"text file {path} is not UTF-8 text ({err.reason})") from err


def hf_texts(name: str, *, split: str = "train", text_key: str = "text") -> TextOpener:
    """An opener streaming a Hugging Face dataset's text field (needs the hub, or its local cache).

    The dataset is resolved now, so that a wrong name or an unreachable hub is a `DataSourceError`
    before any model is loaded; each call of the opener streams it from the start.
    """
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as err:  # datasets raises many types: connection, not found, bad split
        raise DataSourceError(f"cannot open Hugging Face dataset {name!r} split {split!r} ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); it needs the hub or a local "
                              "dataset folder; pass a .txt or .jsonl file otherwise") from err

    def open_dataset() -> Iterator[str]:
        for record in dataset:
            if text_key not in record:
                raise DataSourceError(f"dataset {name!r} has no field {text_key!r}; fields: {sorted(record)}")
            yield record[text_key]

    return open_dataset


class TokenRows:
    """Fixed-length token rows from a text opener, cycling over the texts when they run out.

    The position (rows served, epoch) is the state; restoring it re-reads and re-tokenizes the
    texts up to that point, which costs far less than the forward passes it saves.
    """

    def __init__(self, model: Any, open_texts: TextOpener, *, context_size: int, description: str, rank: int = 0,
                 world_size: int = 1) -> None:
        if context_size < 2:
            raise DataSourceError(f"context_size must be at least 2 (BOS + one token), got {context_size}")
        if not 0 <= rank < world_size:
            raise DataSourceError(f"TokenRows rank must be in [0, {world_size}), got {rank}")
        # Data parallelism: rank r of N keeps rows r, r + N, r + 2N, ... of the one token stream
        # (tokenizing every row is cheap next to the forward passes it saves the other ranks).
        self.rank, self.world_size = rank, world_size
        self.model = model
        self.open_texts = open_texts
        self.context_size = context_size
        self.description = description
        self.bos = tl_compat.bos_token_id(model)
        self.epoch, self.rows_served = 0, 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        self._pieces = self._token_pieces()
        self._pending: list[int] = []
        self._rows_in_epoch = 0

    def _token_pieces(self) -> Iterator[list[int]]:
        """The token stream in bounded pieces: each document's tokens window by window
        (`encode_windows`: a 20 MB one-line document is never tokenized, or held, whole), then BOS."""
        for text in self.open_texts():
            yield from encode_windows(self.model, text)
            yield [self.bos]

    def _next_row(self) -> list[int]:
        need = self.context_size - 1
        while len(self._pending) < need:
            piece = next(self._pieces, None)
            if piece is None:
                if self._rows_in_epoch == 0:
                    raise DataSourceError(f"{self.description} holds fewer than {need} tokens: not one row")
                log.info("%s: epoch %d done after %d rows; starting again", self.description, self.epoch,
                         self._rows_in_epoch)
                self.epoch += 1
                self._start_epoch()
                continue
            self._pending.extend(piece)
        row, self._pending = [self.bos] + self._pending[:need], self._pending[need:]
        self._rows_in_epoch += 1
        self.rows_served += 1
        return row

    def next_rows(self, n: int) -> Int[Tensor, "row pos"]:
        if self.world_size == 1:
            return torch.tensor([self._next_row() for _ in range(n)], dtype=torch.long)
        rows: list[list[int]] = []
        while len(rows) < n:
            row = self._next_row()
            if (self.rows_served - 1) % self.world_size == self.rank:
                rows.append(row)
        return torch.tensor(rows, dtype=torch.long)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "rows_in_epoch": self._rows_in_epoch, "rows_served": self.rows_served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after `rows_in_epoch` rows of epoch `epoch` (a checkpoint, or `--skip-rows`). A
        position past the text's end is refused as soon as the replay reaches it (replaying on into
        later epochs would make a huge `--skip-rows` endless)."""
        self._start_epoch()
        epoch = self.epoch = int(state["epoch"])
        for rows_read in range(int(state["rows_in_epoch"])):
            self._next_row()
            if self.epoch != epoch:
                raise DataSourceError(f"{self.description}: cannot start after row {state['rows_in_epoch']} of its "
                                      f"text: the text holds {rows_read} rows of {self.context_size} tokens "
                                      f"(--skip-rows too large?)")
        self.rows_served = int(state["rows_served"])
        self.epoch = int(state["epoch"])

    def describe(self) -> dict[str, Any]:
        described = {"text": self.description, "context_size": self.context_size}
        # The rank is left out: every rank of a job must describe the same run.
        return described if self.world_size == 1 else {**described, "stripe_of": self.world_size}
