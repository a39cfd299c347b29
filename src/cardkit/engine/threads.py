"""Intra-op threads per process: cores / processes on this machine, unless set.

torch starts one intra-op thread per core in every process, so two processes on two cores run four
threads and slow each other several times over (a PGD-AT epoch ran 6-10x slower than with one
thread each). cardkit sets the count once per process before any work.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def local_processes() -> int:
    """Processes that share this machine: torchrun's LOCAL_WORLD_SIZE, else 1."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def default_threads() -> int:
    """OMP_NUM_THREADS when the user set it, else the cores divided among the local processes."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    return max(1, available_cores() // local_processes())


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (`threads`, or the default) and return the count."""
    count = default_threads() if threads is None else threads
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
        log.debug("using %d intra-op threads", count)
    return count
