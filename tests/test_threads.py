"""Intra-op threads per process: cores divided among the local processes unless set."""

import pytest
import torch

from cardkit.config import validate_config
from cardkit.engine import threads
from cardkit.engine.pipeline import prepare_process


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cores, local, omp, expected", [
    (2, None, None, 2),     # one process: every core
    (2, "2", None, 1),      # torchrun --nproc-per-node 2 on 2 cores: one each
    (16, "3", None, 5),     # rounded down, never oversubscribed
    (2, "4", None, 1),      # more processes than cores: still one thread
    (8, "2", "3", 3),       # the user's OMP_NUM_THREADS wins
    (8, None, "", 8),       # an empty OMP_NUM_THREADS counts as unset
])
def test_default_threads_divide_the_cores_among_local_processes(monkeypatch, cores, local, omp, expected):
    monkeypatch.setattr(threads, "available_cores", lambda: cores)
    for name, value in (("LOCAL_WORLD_SIZE", local), ("OMP_NUM_THREADS", omp)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert threads.default_threads() == expected


def test_the_config_sets_the_threads_of_the_process(restore_threads, monkeypatch):
    torch.set_num_threads(1)
    prepare_process(validate_config({"threads": 2, "device": "cpu"}))
    assert torch.get_num_threads() == 2
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    prepare_process(validate_config({"device": "cpu"}))
    assert torch.get_num_threads() == 1


def test_threads_must_be_a_positive_count():
    from cardkit.errors import CardkitError

    with pytest.raises(CardkitError, match="threads: given 0"):
        validate_config({"threads": 0})
