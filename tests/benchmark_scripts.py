"""The scripts in benchmarks/ as modules, for tests that reuse their probes (benchmarks/ is not a package)."""
import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str, alias: str | None = None):
    """``benchmarks/<name>.py`` imported once, as ``alias`` (default ``name``) in ``sys.modules`` (dataclasses
    and pickling need it registered); ``benchmarks/`` goes on ``sys.path`` for the scripts' own imports."""
    alias = alias or name
    if alias in sys.modules:
        return sys.modules[alias]
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(alias, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return module
