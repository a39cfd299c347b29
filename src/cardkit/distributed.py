"""Data-parallel processes under torchrun: who this process is, and the few collectives cardkit needs.

cardkit runs on PyTorch's own engine: torchrun starts the processes and sets RANK, WORLD_SIZE and
LOCAL_RANK; `init_from_env` joins them in a process group (gloo on CPU, nccl on CUDA), training wraps
its step in DistributedDataParallel, and evaluation splits its points over the ranks and reduces the
counts exactly. Without torchrun (or with one process) every function here is a no-op, so
single-process code pays nothing. Only rank 0 writes files, logs and shows progress.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from cardkit.errors import CardkitError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's rank and the number of processes (0 and 1 outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def is_main() -> bool:
    return world().main


def launched_size() -> int:
    """The processes torchrun started (WORLD_SIZE), 1 without torchrun."""
    value = os.environ.get("WORLD_SIZE", "")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def init_from_env(device: torch.device) -> torch.device:
    """Join torchrun's process group once per process; return this rank's device.

    On CUDA each process takes the GPU of its LOCAL_RANK and the group uses nccl; on the CPU, gloo.
    """
    if launched_size() == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        if not is_main():  # one voice: rank 0 logs and warns for all
            logging.getLogger("cardkit").setLevel(logging.ERROR)
        log.info("data-parallel over %d processes (%s)", world().size, backend)
    return device


def shutdown(finished: bool) -> None:
    """Leave the process group before exit: gloo's threads torn down by the interpreter's exit instead
    can abort the process. After a finished command the ranks first wait for each other, so no rank
    closes its connections while another is still reading from them."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def barrier() -> None:
    if world().size > 1:
        dist.barrier()


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over ranks (in place, and returned); float64 sums of counts are exact."""
    if world().size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_and(flags: torch.Tensor) -> torch.Tensor:
    """Per-point boolean flags ANDed over the ranks (each rank clears only its own points' flags)."""
    if world().size == 1:
        return flags
    values = flags.to(torch.uint8)
    dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return values.bool()


def owns(number: int) -> bool:
    """Whether work item `number` (an evaluation batch) is this rank's: round-robin over the ranks,
    always true in one process."""
    here = world()
    return number % here.size == here.rank


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if world().size == 1:
        return [obj]
    gathered: list[Any] = [None] * world().size
    dist.all_gather_object(gathered, obj)
    return gathered


def on_main(fn: Callable[[], T]) -> T | None:
    """Run `fn` on rank 0 only (e.g. writing a run folder) and let the others wait for it; a user
    error on rank 0 is raised on every rank, so no process is left waiting on the others."""
    if world().size == 1:
        return fn()
    result, error, message = None, None, None
    if is_main():
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - raised again below, on rank 0 as it was
            error = exc
            message = str(exc) if isinstance(exc, CardkitError) else f"rank 0 failed: {type(exc).__name__}: {exc}"
    message = gather_objects(message)[0]
    if error is not None:
        raise error
    if message is not None:
        raise CardkitError(message)
    return result


def shard_slice(n: int, rank: int, size: int) -> slice:
    """Rank `rank`'s contiguous part of n items split over `size` ranks (the first n % size ranks
    get one more), as torch.tensor_split does."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))
