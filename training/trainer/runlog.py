"""The training log: a local JSONL file always, wandb when a project is named, a tqdm bar.

Records hold only values that are a function of the training state (no wall-clock times), so
an interrupted-and-resumed run writes exactly the records of an uninterrupted one: on resume
the file is cut back to the checkpoint's step before new records are appended.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sae.files import atomic_write
from sae.safe_io import read_text

log = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"
WANDB_ID_FILE = "wandb_run_id"
MAX_LOG_BYTES = 1 << 30
"""Largest training log read back on resume (a record is a few hundred bytes)."""
BAR_KEYS = ("mse", "explained_variance", "l0", "dead_fraction")
BAR_NAMES = {"mse": "mse", "explained_variance": "ev", "l0": "L0", "dead_fraction": "dead"}


class RunLog:
    """Where metric records go. `history` keeps every record of the run in memory too."""

    def __init__(self, out_dir: Path | None, *, total_steps: int, start_step: int, progress_bar: bool,
                 wandb_project: str | None = None, run_config: dict[str, Any] | None = None) -> None:
        self.path = None if out_dir is None else Path(out_dir) / LOG_FILE
        self.history: list[dict[str, Any]] = self._restore(start_step)
        self._bar = tqdm(total=total_steps, initial=start_step, disable=not progress_bar, unit="step",
                         dynamic_ncols=True, desc="training")
        self._wandb = None
        if wandb_project is not None:
            import wandb

            self._wandb = wandb.init(project=wandb_project, config=run_config or {}, id=self._wandb_id(out_dir),
                                     resume="allow", dir=None if out_dir is None else str(out_dir))

    @staticmethod
    def _wandb_id(out_dir: Path | None) -> str | None:
        """One wandb run per output folder: a resumed run appends to the run it started."""
        if out_dir is None:
            return None
        path = Path(out_dir) / WANDB_ID_FILE
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, uuid.uuid4().hex[:16].encode())
        return path.read_text().strip()

    def _restore(self, start_step: int) -> list[dict[str, Any]]:
        if self.path is None:
            return []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            self.path.write_text("")
            return []
        kept = []
        for line in read_text(self.path, max_bytes=MAX_LOG_BYTES).splitlines():  # a FIFO or /dev/zero link: refused
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut by a crash: it and anything after it are re-logged
            if record.get("step", 0) > start_step:
                break
            kept.append(record)
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        return kept

    def write(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record, allow_nan=True) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        shown = {BAR_NAMES[k]: f"{record[k]:.4g}" for k in BAR_KEYS if isinstance(record.get(k), float)}
        if shown:
            self._bar.set_postfix(shown, refresh=False)

    def advance(self, steps: int = 1) -> None:
        self._bar.update(steps)

    def close(self) -> None:
        self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
