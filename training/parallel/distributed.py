"""This process's place in a torch.distributed job, and the few collectives training needs.

`torchrun` (or any launcher that sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
`MASTER_PORT`) starts one process per rank; `init_distributed()` joins them. The backend is
gloo on CPU and nccl where CUDA is present (DESIGN.md, scale). Every collective is a plain
`torch.distributed` call on tensors; structured values (a data source's position, a
checkpoint's state) travel as bytes in uint8 tensors, encoded as strict JSON plus safetensors,
so nothing received from another process is ever unpickled (RELIABILITY.md R1) — which is why
`all_gather_object` and friends are not used.

Every call is timed into `Collective.comm_seconds`, which is how the benchmark reports the share
of step time spent communicating. A job whose peer dies fails at the next collective (gloo sees
the closed connection) or, at worst, after `timeout_s` — never a silent hang.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from training.errors import TrainingConfigError
from training.state import flatten_state, unflatten_state

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 600.0


def launched_world_size() -> int:
    """WORLD_SIZE as a launcher (torchrun) set it; 1 when started as a plain process."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise TrainingConfigError(f"environment variable WORLD_SIZE={value!r} is not a positive integer")
    return int(value)


class Collective:
    """Rank, world size and the timed collectives of an initialised process group.

    `device` is where the small tensors this class creates (lengths, bytes, flags) live: the CPU,
    through gloo. Tensors passed in are reduced where they are (CUDA ones through nccl).
    """

    def __init__(self, device: torch.device) -> None:
        if not dist.is_initialized():
            raise TrainingConfigError("Collective needs an initialised torch.distributed process group "
                                      "(call init_distributed())")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = device
        self.comm_seconds = 0.0
        """Wall time spent inside collectives since construction (or the last reset)."""
        self.comm_calls = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _timed(self, fn: Callable[[], T]) -> T:
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # nccl returns before the transfer ends
        self.comm_seconds += time.perf_counter() - start
        self.comm_calls += 1
        return result

    # ------------------------------------------------------------------------- tensors
    def all_reduce_sum_(self, tensor: Tensor) -> Tensor:
        """Sum `tensor` over ranks, in place; every rank gets the same result."""
        self._timed(lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM))
        return tensor

    def broadcast_(self, tensor: Tensor, src: int = 0) -> Tensor:
        """Overwrite `tensor` on every rank with rank `src`'s."""
        self._timed(lambda: dist.broadcast(tensor, src=src))
        return tensor

    def all_gather_rows(self, rows: Tensor) -> Tensor:
        """Every rank's `(n, ...)` tensor stacked in rank order (equal n on every rank)."""
        parts = [torch.empty_like(rows) for _ in range(self.world_size)]
        self._timed(lambda: dist.all_gather(parts, rows.contiguous()))
        return torch.cat(parts)

    def barrier(self) -> None:
        self._timed(dist.barrier)

    # ------------------------------------------------------------------------- bytes
    def _send_bytes(self, data: bytes, dst: int) -> None:
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        length = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        self._timed(lambda: dist.send(length, dst=dst))
        if data:
            self._timed(lambda: dist.send(payload.to(self.device), dst=dst))

    def _recv_bytes(self, src: int) -> bytes:
        length = torch.empty(1, dtype=torch.int64, device=self.device)
        self._timed(lambda: dist.recv(length, src=src))
        if int(length) == 0:
            return b""
        payload = torch.empty(int(length), dtype=torch.uint8, device=self.device)
        self._timed(lambda: dist.recv(payload, src=src))
        return payload.cpu().numpy().tobytes()

    def gather_bytes(self, data: bytes) -> list[bytes] | None:
        """Each rank's `data`, in rank order, on rank 0 (None elsewhere)."""
        if not self.is_main:
            self._send_bytes(data, 0)
            return None
        return [data] + [self._recv_bytes(src) for src in range(1, self.world_size)]

    def scatter_bytes(self, parts: Sequence[bytes] | None) -> bytes:
        """Rank 0 holds one part per rank; each rank receives its own."""
        if not self.is_main:
            return self._recv_bytes(0)
        if parts is None or len(parts) != self.world_size:
            raise TrainingConfigError(f"scatter_bytes needs {self.world_size} parts on rank 0, got "
                                      f"{None if parts is None else len(parts)}")
        for dst in range(1, self.world_size):
            self._send_bytes(parts[dst], dst)
        return parts[0]

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0's `data` on every rank."""
        length = torch.tensor([len(data) if self.is_main and data else 0], dtype=torch.int64, device=self.device)
        self.broadcast_(length)
        if int(length) == 0:
            return b""
        payload = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device) if self.is_main
                   else torch.empty(int(length), dtype=torch.uint8, device=self.device))
        self.broadcast_(payload)
        return payload.cpu().numpy().tobytes()

    def check_same(self, text: str, what: str) -> None:
        """Raise on every rank unless every rank holds the same `text` (a config fingerprint)."""
        digest = torch.frombuffer(bytearray(text.encode().ljust(64)[:64]), dtype=torch.uint8).to(self.device)
        every = self.all_gather_rows(digest.unsqueeze(0))
        differ = [r for r in range(self.world_size) if not torch.equal(every[r], every[0])]
        if differ:
            raise TrainingConfigError(f"{what} differs between rank 0 and rank(s) {differ}: every rank must be "
                                      "started with the same configuration")


def init_distributed(*, timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None) -> Collective:
    """Join the job a launcher started (env:// rendezvous); gloo on CPU, nccl for CUDA tensors."""
    if not dist.is_available():
        raise TrainingConfigError("this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise TrainingConfigError(f"not started by a launcher: environment variables {missing} are unset; "
                                  "run under `torchrun --nproc-per-node N ...`")
    if backend is None:
        # On GPUs, CUDA tensors (gradients of SAEs placed there) go through nccl; the small CPU
        # tensors (flags, data positions, checkpoint bytes) still go through gloo.
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if "nccl" in backend:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    collective = Collective(torch.device("cpu"))
    log.info("rank %d of %d joined (%s, timeout %gs)", collective.rank, collective.world_size, backend, timeout_s)
    return collective


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def assigned(n_units: int, rank: int, world_size: int) -> list[int]:
    """SAE parallelism: the units (SAEs, sites) rank `rank` trains, dealt round-robin."""
    if n_units < world_size:
        raise TrainingConfigError(f"{n_units} SAE(s) cannot be spread over {world_size} ranks: every rank needs "
                                  "at least one; start fewer ranks or train more SAEs")
    return list(range(rank, n_units, world_size))


# ----------------------------------------------------------------------------- state as bytes
def state_to_bytes(state: Any) -> bytes:
    """Nested state (tensors, JSON values) as bytes: an 8-byte JSON length, the JSON tree, safetensors."""
    tensors, tree = flatten_state(state)
    text = json.dumps(tree, allow_nan=False).encode()
    return len(text).to_bytes(8, "little") + text + save_safetensors_bytes(tensors)


def state_from_bytes(blob: bytes) -> Any:
    length = int.from_bytes(blob[:8], "little")
    tree = json.loads(blob[8 : 8 + length])
    return unflatten_state(tree, load_safetensors_bytes(blob[8 + length :]))
