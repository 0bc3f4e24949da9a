"""selfxit: make a frozen pretrained classifier answer early for easy inputs, label-free.

The public names load on first use (PEP 562 module ``__getattr__``): ``import selfxit`` alone, which every
``selfxit`` command does before parsing its arguments, must not import torch. ``from selfxit import wrap``
and ``selfxit.wrap(...)`` work as before. Subpackages (``selfxit.search``, ``selfxit.zoo`` ...) also load on
first attribute access, so ``selfxit.search.apply_search`` works after a plain ``import selfxit``.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "wrap": "selfxit.api",
    "load": "selfxit.api",
    "EarlyExitModel": "selfxit.api",
    "FitReport": "selfxit.api",
    "DistillConfig": "selfxit.fit.distill",
    "FitConfig": "selfxit.fit.config",
    "EarlyExitOutput": "selfxit.core.runtime",
    "SampleResult": "selfxit.core.runtime",
    "FINAL": "selfxit.core.runtime",
}
_SUBPACKAGES = ("api", "cli", "core", "evaluate", "fit", "ops", "search", "serve", "settings", "zoo")

__all__ = [
    "FINAL",
    "DistillConfig",
    "EarlyExitModel",
    "EarlyExitOutput",
    "FitConfig",
    "FitReport",
    "SampleResult",
    "load",
    "wrap",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBPACKAGES))
