import os

import pytest

os.environ.setdefault("NNI_FRAMEWORK", "none")

from selfxit.settings import shared_dir  # noqa: E402


@pytest.fixture(scope="session")
def shared():
    """The real shared material; tests that need it skip with a reason when it is absent."""
    root = shared_dir()
    if not (root / "data" / "cifar10-test").is_dir():
        pytest.skip(f"shared material not found at {root} (set SELFXIT_SHARED)")
    return root
