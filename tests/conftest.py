import os

import pytest

os.environ.setdefault("NNI_FRAMEWORK", "none")

from selfxit.settings import shared_dir  # noqa: E402

# A skipped ``needs_shared`` test fails the run when the shared folder is present: a run that has the real material
# must not pass by skipping the tests that read it. SELFXIT_REQUIRE_SHARED=1 demands the folder (absent: the skips
# fail the run too), SELFXIT_REQUIRE_SHARED=0 only reports the skips; unset: demanded exactly when the folder exists.
REQUIRE_SHARED = "SELFXIT_REQUIRE_SHARED"


@pytest.fixture(scope="session")
def shared():
    """The real shared material; tests that need it skip with a reason when it is absent."""
    root = shared_dir()
    if not (root / "data" / "cifar10-test").is_dir():
        pytest.skip(f"shared material not found at {root} (set SELFXIT_SHARED)")
    return root


@pytest.fixture(scope="session")
def slow_setup():
    """Requested by fixtures that take more than ~5 s to build (a bundle fitted on real images): every test that
    uses such a fixture is marked ``slow``, so ``-m "not slow"`` skips building it."""


def pytest_collection_modifyitems(config, items):
    for item in items:  # fixturenames: requested directly or through another fixture
        if "shared" in item.fixturenames:
            item.add_marker(pytest.mark.needs_shared)
        if "slow_setup" in item.fixturenames:
            item.add_marker(pytest.mark.slow)
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items:
        import torch

        if not torch.cuda.is_available():
            for item in gpu_items:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


def pytest_configure(config):
    config.pluginmanager.register(SharedSkips(), "selfxit-shared-skips")


class SharedSkips:
    """Counts skipped needs_shared tests and fails the session for them when the shared folder is required."""

    def __init__(self):
        self.skipped: list[tuple[str, str]] = []  # (node id, skip reason)

    @staticmethod
    def required() -> bool:
        flag = os.environ.get(REQUIRE_SHARED, "").strip().lower()
        return flag not in ("0", "false", "no") if flag else shared_dir().is_dir()

    def message(self) -> str | None:
        if not self.skipped or not self.required():
            return None
        root = shared_dir()
        where = (f"although it is present at {root}" if root.is_dir()
                 else f"and {REQUIRE_SHARED} demands it, but there is none at {root}")
        return f"{len(self.skipped)} tests that need ../shared were skipped {where}"

    def pytest_runtest_logreport(self, report):
        if report.skipped and not hasattr(report, "wasxfail") and "needs_shared" in report.keywords:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.skipped.append((report.nodeid, reason.removeprefix("Skipped: ")))

    def pytest_sessionfinish(self, session):
        if self.message() and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        message = self.message()
        if message is None:
            return
        terminalreporter.section("needs_shared tests skipped", sep="=", red=True, bold=True)
        for nodeid, reason in self.skipped[:20]:
            terminalreporter.write_line(f"SKIPPED {nodeid}: {reason}")
        if len(self.skipped) > 20:
            terminalreporter.write_line(f"... and {len(self.skipped) - 20} more")
        terminalreporter.write_line(f"FAILED: {message} (set {REQUIRE_SHARED}=0 to allow it)", red=True, bold=True)
