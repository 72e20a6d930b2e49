"""The app's jobs: one at a time per model, with progress and cancellation between forward passes.

A job runs one piece of work (a sweep, a steered generation, a circuit) on a worker thread. While it
runs, a hook on the model's last residual hook counts the rows that reach it (progress) and raises
`JobCancelled` at the next forward pass once a cancel was asked for: the library's context managers
(`splice`, `steer`, `tl_compat.hooks`) restore the model in `finally`, so a cancelled job leaves it as
it found it (RELIABILITY.md R5). A second job, or a quick request, while one runs gets `BusyError`
(HTTP 409 in the server) rather than queueing behind minutes of work.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from sae.errors import LatentpatchError

log = logging.getLogger(__name__)

JobState = Literal["running", "done", "failed", "cancelled"]
MAX_FINISHED = 32
"""Finished jobs kept for their results (the oldest are dropped): memory stays bounded (R12)."""


class AppInputError(LatentpatchError, ValueError):
    """A request the app refuses before any forward pass (empty prompt, too many tokens, unknown SAE or
    latent, absurd coefficient); the message says what was expected and what came."""


class BusyError(LatentpatchError, RuntimeError):
    """The model is running another job: one job at a time per model."""


class JobCancelled(LatentpatchError, RuntimeError):
    """Raised inside a forward pass of a job whose cancel was asked for."""


@dataclass
class Job:
    """One unit of work's live record: what the page polls."""

    id: str
    kind: str
    state: JobState = "running"
    phase: str = "starting"
    """What the job is doing now, in words."""
    rows: int = 0
    """Rows (prompt runs) that reached the model's last layer so far."""
    expected_rows: int | None = None
    """Rows the current phase should run, where known (progress = rows / expected_rows)."""
    events: list[dict[str, Any]] = field(default_factory=list)
    """Results in the order they became visible (a heatmap, a token of a continuation, a check)."""
    error: str | None = None
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None
    cancel_requested: threading.Event = field(default_factory=threading.Event, repr=False)
    changed: threading.Condition = field(default_factory=threading.Condition, repr=False)
    """Notified at each event and when the job ends: a long poll (`wait_for`) answers at once."""

    def emit(self, kind: str, **data: Any) -> None:
        """Publish one result; appending to a list is atomic under the GIL, so readers need no lock.
        Non-finite numbers become None: strict JSON has no NaN (a Spearman of one unit is NaN)."""
        with self.changed:
            self.events.append({"kind": kind, "t": round(time.perf_counter() - self.started, 4), **finite(data)})
            self.changed.notify_all()

    def wait_for(self, since: int, timeout: float) -> None:
        """Return once there are more than `since` events or the job has ended, or after `timeout` seconds
        (the page's progress bar refreshes at least that often)."""
        with self.changed:
            self.changed.wait_for(lambda: len(self.events) > since or self.state != "running", timeout=timeout)

    def end(self, state: JobState, error: str | None = None) -> None:
        with self.changed:
            self.state, self.error, self.finished = state, error, time.perf_counter()
            self.changed.notify_all()

    def set_phase(self, phase: str, expected_rows: int | None = None) -> None:
        self.phase, self.rows, self.expected_rows = phase, 0, expected_rows

    def to_dict(self, since: int = 0) -> dict[str, Any]:
        progress = None
        if self.expected_rows:
            progress = min(self.rows / self.expected_rows, 1.0 if self.state != "running" else 0.99)
        return {"id": self.id, "kind": self.kind, "state": self.state, "phase": self.phase, "rows": self.rows,
                "progress": progress, "events": self.events[since:], "n_events": len(self.events), "error": self.error,
                "seconds": round((self.finished or time.perf_counter()) - self.started, 3)}


def finite(value: Any) -> Any:
    """`value` with every NaN or infinity, however nested in dicts and lists, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


class JobRunner:
    """Runs jobs on one model, one at a time; `lock` is also held by quick requests that run the model."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)

    @contextlib.contextmanager
    def quick(self) -> Iterator[None]:
        """Hold the model for a short request, or refuse with `BusyError` (never wait behind a job)."""
        if not self.lock.acquire(blocking=False):
            raise BusyError(self._busy_message())
        try:
            yield
        finally:
            self.lock.release()

    def start(self, kind: str, work: Callable[[Job], None]) -> Job:
        """Start `work(job)` on a worker thread, or raise `BusyError` if the model is taken."""
        if not self.lock.acquire(blocking=False):
            raise BusyError(self._busy_message())
        job = Job(id=f"{kind}-{next(self._ids)}", kind=kind)
        self.jobs[job.id] = job
        self._forget_old()
        threading.Thread(target=self._run, args=(job, work), name=job.id, daemon=True).start()
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        job.cancel_requested.set()
        return job

    def get(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise AppInputError(f"no job {job_id!r} (jobs are kept until {MAX_FINISHED} newer ones finish)")
        return self.jobs[job_id]

    def running(self) -> Job | None:
        return next((job for job in self.jobs.values() if job.state == "running"), None)

    def _run(self, job: Job, work: Callable[[Job], None]) -> None:
        state: JobState = "failed"
        error: str | None = "internal error (the server's log has the details)"
        try:
            with watching(self.model, job):
                work(job)
            state, error = "done", None
        except JobCancelled:
            state, error = "cancelled", "cancelled at your request"
        except LatentpatchError as err:  # inputs only the library could judge: its typed message, no trace
            error = str(err)
        except Exception:  # a bug: logged with its traceback on the server, one line on the page
            log.exception("job %s failed", job.id)
        finally:
            self.lock.release()  # before the job reads as ended: a client told "done" may start the next one
            job.end(state, error)

    def _busy_message(self) -> str:
        job = self.running()
        what = f"job {job.id} ({job.phase})" if job is not None else "another request"
        return f"the model is busy with {what}: one job at a time per model; wait for it or cancel it"

    def _forget_old(self) -> None:
        finished = [job_id for job_id, job in self.jobs.items() if job.state != "running"]
        for job_id in finished[: max(len(finished) - MAX_FINISHED, 0)]:
            del self.jobs[job_id]


@contextlib.contextmanager
def watching(model: Any, job: Job) -> Iterator[None]:
    """A hook on the last block's output for the duration of a job: counts rows, raises `JobCancelled`
    at the first forward pass after a cancel (the hook returns None: outputs are untouched)."""
    from patching.model import tl_compat
    from patching.model.sites import Site

    def count(output: Any) -> None:
        if job.cancel_requested.is_set():
            raise JobCancelled(f"job {job.id} cancelled")
        job.rows += int(output.shape[0])
        return None

    last = Site(layer=tl_compat.n_layers(model) - 1, kind="resid_post")
    with tl_compat.hooks(model, [(last.hook_name, count)]):
        yield
