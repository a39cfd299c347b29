import os
from pathlib import Path

import pytest
import torch

# One intra-op thread per test process (and for the cardkit processes tests start): these small
# models gain nothing from a second thread, and two processes with torch's default threads on two
# cores oversubscribe them several times over. Tests of thread counts set their own.
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    if not os.environ.get(_variable, "").isdigit():
        os.environ[_variable] = "1"
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (see the README's Testing section)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """Files with slow tests first, each file's tests in their own order: pytest-xdist hands out
    whole files in this order, so the long ones start early and the short ones fill the gaps at
    the end instead of one process finishing a long file alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
