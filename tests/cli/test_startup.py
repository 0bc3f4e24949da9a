"""Start-up cost: ``selfxit --help``, an argument error and ``import selfxit`` must not import the heavy stack.

Importing torch, NNI, DeepSpeed, FastAPI or matplotlib takes seconds; a command that only parses its
arguments, or a program that only imports the package, must not pay for it. Wall-clock times vary too much
on shared machines to assert, so these tests check the cause instead: which modules got imported.
Each check runs in a fresh interpreter, since this test process has long since imported everything.
"""
import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "nni", "deepspeed", "fastapi", "matplotlib")
ENV = {**os.environ, "NNI_FRAMEWORK": "none"}


def _heavy_modules_after(code: str) -> list[str]:
    """The HEAVY modules loaded by a fresh interpreter after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=ENV, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_help_exits_zero_and_lists_every_command():
    proc = subprocess.run([sys.executable, "-m", "selfxit", "--help"], capture_output=True, text=True, env=ENV,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for command in ("enable", "search", "evaluate", "candidates", "demo", "report", "serve", "collect", "retrain",
                    "rollback", "versions"):
        assert command in proc.stdout


def test_building_the_parser_imports_nothing_heavy():
    assert _heavy_modules_after("from selfxit.cli import build_parser; build_parser()") == []


@pytest.mark.parametrize("command", ["enable", "search", "evaluate", "candidates", "demo", "report", "serve",
                                     "collect", "retrain", "rollback", "versions"])
def test_subcommand_help_imports_nothing_heavy(command):
    code = ("import sys\nfrom selfxit.cli import main\n"
            f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit as exc:\n    assert exc.code == 0, exc.code")
    assert _heavy_modules_after(code) == []


def test_argument_error_answers_before_importing_anything_heavy():
    code = ("from selfxit.cli import main\n"
            "try:\n    main(['enable', '--model', 'cifar_resnet20'])\n"
            "except SystemExit as exc:\n    assert exc.code == 2, exc.code\nelse:\n    raise AssertionError('no error')")
    assert _heavy_modules_after(code) == []


def test_import_selfxit_is_lazy():
    assert _heavy_modules_after("import selfxit; selfxit.__version__") == []


@pytest.mark.slow
def test_public_names_still_resolve():
    code = ("import selfxit\n"
            "missing = [n for n in selfxit.__all__ if getattr(selfxit, n, None) is None]\n"
            "assert not missing, missing\n"
            "from selfxit import wrap, load, FINAL\n"
            "assert selfxit.search.__name__ == 'selfxit.search'\n"  # subpackages load on first access too
            "try:\n    selfxit.no_such_name\nexcept AttributeError:\n    pass\n"
            "else:\n    raise AssertionError('no AttributeError')")
    assert "torch" in _heavy_modules_after(code)
