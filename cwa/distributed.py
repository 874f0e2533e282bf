"""Scoring across processes: `torchrun --nproc-per-node N -m cwa score ...`.

torchrun starts N copies of `cwa score` and tells each its place through environment
variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`). `session()`
reads them, opens the default process group (gloo when the model is on the CPU, NCCL when
it is on CUDA) and closes it afterwards; without torchrun it yields the single-process
`Dist()` and touches nothing.

How a sharded run gives the single-process result: every metric keeps its state in
`metric.acc`, sums over windows already divided by N, the total number of calibration
windows (`cwa.metrics.base`). Each rank loads the same calibration windows, accumulates
only its shard of them (`Dist.shard`), then the accumulators are summed across ranks
(`Dist.all_reduce`, in the fixed order of `metric.acc`), so every rank ends with the
full sums and computes the same scores; rank 0 writes the artifact. Randomness is keyed
on what a number serves, never on the rank: `hessian_diag` labels on
(seed, "label", global window index, draw), `hutchinson_diag` probes on
(seed, "probe", probe, parameter index), so a window draws the same numbers on any rank.
What differs is the order of the float32 additions (≤ 1e-4 relative), and it does not
matter whether shards are contiguous or strided.

Collectives run on the rank's own device: the CPU for gloo, `cuda:LOCAL_RANK` for NCCL.
An accumulator elsewhere (a `--device-map` model spread over several GPUs, or one kept
on the CPU) is copied there in pieces of at most `COMM_CHUNK_BYTES`, reduced and copied
back, so the extra memory is bounded whatever the tensor's size.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from collections.abc import Iterator
from dataclasses import dataclass

from cwa.errors import UsageError

STRATEGIES = ("contiguous", "strided")
COMM_CHUNK_BYTES = 256 << 20
DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly single-process) run and its collectives."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group (single process)
    device: str = "cpu"  # where collectives run
    strategy: str = "contiguous"  # how windows are split across ranks

    @property
    def enabled(self) -> bool:
        return self.backend is not None and self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> range:
        """Positions (0..n-1) of the windows this rank processes."""
        return shard_positions(n, self.rank, self.world_size, self.strategy)

    def all_reduce(self, t) -> None:
        """In-place sum of `t` over every rank (a no-op in a single process)."""
        if not self.enabled:
            return
        import torch
        import torch.distributed as tdist

        comm = torch.device(self.device)
        if t.device == comm:
            tdist.all_reduce(t)
            return
        # copy through the communication device piece by piece: bounded extra memory
        flat = t.view(-1)
        step = max(1, COMM_CHUNK_BYTES // max(1, t.element_size()))
        for start in range(0, flat.numel(), step):
            piece = flat[start : start + step].to(comm)
            tdist.all_reduce(piece)
            flat[start : start + step].copy_(piece)

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's `flag` on every rank (so that all ranks take the same branch)."""
        if not self.enabled:
            return bool(flag)
        import torch
        import torch.distributed as tdist

        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self.device)
        tdist.broadcast(t, src=0)
        return bool(int(t.item()))

    def barrier(self) -> None:
        if not self.enabled:
            return
        import torch.distributed as tdist

        if self.backend == "nccl":
            tdist.barrier(device_ids=[int(self.device.split(":")[1])])
        else:
            tdist.barrier()


def shard_positions(n: int, rank: int, world_size: int, strategy: str = "contiguous") -> range:
    """The positions of rank `rank`'s windows out of `n`: every position exactly once
    over all ranks; shard sizes differ by at most one (a rank may get none)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    if strategy == "strided":
        return range(rank, n, world_size)
    if strategy != "contiguous":
        raise UsageError(f"Unknown sharding {strategy!r}; use one of {', '.join(STRATEGIES)}.")
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name, "")
    if v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise UsageError(f"environment variable {name}={v!r} is not an integer") from None


def env_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent")
    return rank, world, local


def launched() -> bool:
    """True inside a multi-process launch (torchrun with more than one process)."""
    return env_ranks()[1] > 1


def wants_cuda(device: str | None) -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    return device in (None, "auto") or str(device).startswith("cuda")


def current(strategy: str = "contiguous") -> Dist:
    """The Dist of an already initialised default process group, else a single process."""
    try:
        import torch.distributed as tdist
    except ImportError:  # pragma: no cover - torch without distributed support
        return Dist()
    if not (tdist.is_available() and tdist.is_initialized()):
        return Dist()
    backend = str(tdist.get_backend())
    rank, world = tdist.get_rank(), tdist.get_world_size()
    local = _env_int("LOCAL_RANK", rank)
    device = f"cuda:{local}" if backend == "nccl" else "cpu"
    return Dist(rank, world, local, backend, device, strategy)


@contextlib.contextmanager
def session(
    device: str | None = "auto",
    *,
    backend: str | None = None,
    strategy: str = "contiguous",
    timeout_s: int = DEFAULT_TIMEOUT_S,
) -> Iterator[Dist]:
    """Open the default process group when launched by torchrun; yield this rank's Dist.

    `device` is the `--device` the model will use: CUDA (or auto with CUDA present)
    selects NCCL and pins this process to `cuda:LOCAL_RANK`; otherwise gloo. A group that
    is already open is used as is and left open.
    """
    if strategy not in STRATEGIES:
        raise UsageError(f"Unknown sharding {strategy!r}; use one of {', '.join(STRATEGIES)}.")
    rank, world, local = env_ranks()
    if world <= 1:
        yield Dist(strategy=strategy)
        return
    import torch
    import torch.distributed as tdist

    if not tdist.is_available():  # pragma: no cover - torch built without distributed
        raise UsageError("this torch build has no torch.distributed; run a single process")
    if tdist.is_initialized():
        yield current(strategy)
        return
    if backend is None:
        backend = "nccl" if wants_cuda(device) else "gloo"
    comm_device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(local)
        comm_device = f"cuda:{local}"
    kwargs = {}
    if backend == "nccl":
        kwargs["device_id"] = torch.device(comm_device)
    tdist.init_process_group(
        backend=backend, timeout=_dt.timedelta(seconds=timeout_s), **kwargs
    )
    try:
        yield Dist(rank, world, local, backend, comm_device, strategy)
    finally:
        _drain()
        tdist.destroy_process_group()


def _drain(seconds: float = 0.2) -> None:
    """Let the communication threads finish before the process can exit.

    A gloo worker thread drops its references to a finished collective's tensors just
    after the collective returns, and dropping a tensor that Python also knows needs the
    GIL. If the main thread is already shutting the interpreter down by then, the worker
    cannot take the GIL and the process aborts ("terminate called without an active
    exception", seen here in about one run of three without this; the same race as
    pytorch/pytorch#179291). Sleeping releases the GIL so those threads finish first.
    """
    import time

    time.sleep(seconds)
