import os
import sys
from pathlib import Path

import pytest

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
