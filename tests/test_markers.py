"""The needs_shared guard in tests/conftest.py: a skipped test that needs the shared folder fails a run that has it."""
from pathlib import Path

import pytest
import torch  # imported here, before an in-process pytester run could import (and drop) it

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()
TESTS = """
import pytest

@pytest.fixture
def images(shared):
    return shared / "data" / "cifar10-test"

def test_direct(shared):
    assert shared.is_dir()

def test_indirect(images):
    assert images.is_dir()

def test_plain():
    pass
"""


@pytest.fixture
def run(pytester, monkeypatch, tmp_path):
    """Run TESTS under the project's conftest with the shared folder at ``tmp_path / "shared"``."""
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n    needs_shared: reads the shared folder\n")
    pytester.makepyfile(test_it=TESTS)
    monkeypatch.setenv("SELFXIT_SHARED", str(tmp_path / "shared"))
    monkeypatch.delenv("SELFXIT_REQUIRE_SHARED", raising=False)

    def run(*args, require=None):
        if require is not None:
            monkeypatch.setenv("SELFXIT_REQUIRE_SHARED", require)
        return pytester.runpytest("-p", "no:cacheprovider", *args)
    return run


def test_tests_using_shared_are_marked(run):
    result = run("-m", "needs_shared", "--collect-only", "-q")
    result.stdout.fnmatch_lines(["*test_direct", "*test_indirect", "*2/3 tests collected (1 deselected)*"])


def test_skips_pass_without_the_shared_folder(run):
    result = run()
    result.assert_outcomes(passed=1, skipped=2)
    assert result.ret == 0


def test_skips_fail_the_run_when_the_shared_folder_is_present(run, tmp_path):
    (tmp_path / "shared").mkdir()  # present, but without the images the fixture looks for
    result = run("-rs")
    result.assert_outcomes(passed=1, skipped=2)
    assert result.ret == 1
    result.stdout.fnmatch_lines([
        "SKIPPED *test_direct: shared material not found*",
        f"FAILED: 2 tests that need ../shared were skipped although it is present at {tmp_path / 'shared'}*"])


def test_complete_shared_folder_runs_everything(run, tmp_path):
    (tmp_path / "shared" / "data" / "cifar10-test").mkdir(parents=True)
    result = run()
    result.assert_outcomes(passed=3)
    assert result.ret == 0


def test_require_shared_overrides(run, tmp_path):
    assert run(require="1").ret == 1  # demanded but absent: the skips fail the run
    (tmp_path / "shared").mkdir()
    result = run(require="0")  # present, but skips are allowed
    result.assert_outcomes(passed=1, skipped=2)
    assert result.ret == 0


def test_test_failures_keep_their_exit_status(run, pytester, tmp_path):
    (tmp_path / "shared").mkdir()
    pytester.makepyfile(test_bad="def test_bad():\n    assert False\n")
    assert run().ret == 1
    assert run("-x", "test_it.py::test_direct", "--co").ret == 0  # nothing ran, nothing skipped


def test_gpu_tests_skip_without_cuda(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    pytester.makepyfile(test_gpu="import pytest, torch\n\n@pytest.mark.gpu\ndef test_cuda():\n"
                                 "    assert torch.cuda.is_available()\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(**({"passed": 1} if torch.cuda.is_available() else {"skipped": 1}))
