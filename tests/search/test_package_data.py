"""The shipped search spaces are package data: a plain (non-editable) install finds them by name."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_ships_the_search_spaces_and_they_load_by_name(tmp_path):
    source = tmp_path / "src"  # build from a copy: setuptools writes build/ into the tree it builds
    shutil.copytree(ROOT / "selfxit", source / "selfxit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("selfxit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"selfxit/search/spaces/conv_linear.yaml", "selfxit/search/spaces/linear.yaml"} <= set(names)
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")  # an install outside the source tree
    code = ("import selfxit.search.config as c; assert 'site' in c.__file__, c.__file__; "
            "print(c.load_config('conv_linear').strategy, sorted(c.shipped_configs()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "random" and "conv_linear" in out.stdout
