"""NAS of exit heads with NNI (the ``search`` extra): configs, the model space, and the search itself.

``selfxit.search.apply_search(ee, out_dir)`` gives the heads of a finished search to ``fit``. Names
are imported on first use, so ``import selfxit.search`` does not import NNI.
"""
from __future__ import annotations

import importlib

_NAMES = {"run_search": "run", "load_search": "results", "apply_search": "results", "SearchResult": "results",
          "LayerResult": "results", "load_config": "config", "SearchConfig": "config", "SpaceConfig": "config",
          "SearchConfigError": "config", "shipped_configs": "config"}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f"selfxit.search.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'selfxit.search' has no attribute {name!r}")
