import os
import sys
from pathlib import Path

import pytest
import torch

# The tests' tensors are small, so a second intra-op thread gains little, and on a busy machine
# (CI's 2 cores shared with other jobs) threads that spin-wait for each other make a model forward
# many times slower: one thread per process, for this one and (through the environment) for the
# Python processes that tests start.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# ../shared/fixtures beside the clone (CI) or SVDQUANT_FIXTURES
FIXTURES = Path(os.environ.get("SVDQUANT_FIXTURES", REPO.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def reference_fixture():
    """Path of a file in the reference fixtures; skips the test where the fixtures are absent."""

    def path_of(name: str) -> Path:
        path = FIXTURES / name
        if not path.is_file():
            pytest.skip(f"reference fixture {name} not found in {FIXTURES}")
        return path

    return path_of
