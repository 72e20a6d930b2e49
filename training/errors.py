"""Typed errors raised by the `training` package; messages name expected versus actual."""

from __future__ import annotations

from pathlib import Path

from sae.errors import LatentpatchError


class TrainingConfigError(LatentpatchError, ValueError):
    """A trainer or run configuration is inconsistent; the message says what to change."""


class DataSourceError(LatentpatchError, ValueError):
    """An activation or text source is malformed, exhausted or does not match the SAE."""


class NonFiniteError(LatentpatchError, FloatingPointError):
    """A non-finite value appeared during training; names the step and the tensor.

    Raised before the optimizer step that would have used it, so parameters stay finite and
    the last checkpoint on disk is the last good state.
    """

    def __init__(self, step: int, tensor: str) -> None:
        self.step = step
        self.tensor = tensor
        super().__init__(f"non-finite values in {tensor} at step {step}; parameters were not updated "
                         "and the last checkpoint is untouched")


class CheckpointError(LatentpatchError, ValueError):
    """A checkpoint folder is missing, incomplete, corrupt or was written by another config."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during `Trainer.fit`: the running step finished and a checkpoint was written."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        self.step = step
        self.checkpoint = checkpoint
        super().__init__(f"training interrupted after step {step}; checkpoint: {checkpoint}")


class RunPathError(LatentpatchError, ValueError):
    """A path a run reads or writes cannot be used: missing, of the wrong kind, or not writable."""
