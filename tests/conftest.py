import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("C2AM_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $C2AM_DATA); real-data tests skip with a reason where it is missing."""
    if not DATA.is_dir():
        pytest.skip(f"real-data test: {DATA} is missing (set C2AM_DATA to the shared data folder)")
    return DATA


def pytest_collection_modifyitems(config, items):
    """`fuzz` tests (thousands of mutants, minutes) run only when asked for with `-m fuzz`; other markers are untouched."""
    if "fuzz" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="long fuzz run: select it with -m fuzz")
    for item in items:
        if "fuzz" in item.keywords:
            item.add_marker(skip)
