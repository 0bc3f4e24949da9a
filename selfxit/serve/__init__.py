"""Serving an early-exit model: FastAPI app (:mod:`.app`), request parsing (:mod:`.requests`), micro-batching
(:mod:`.batching`), metrics (:mod:`.metrics`), hot reload (:mod:`.reload`) and live monitoring (:mod:`.monitor`).

``from selfxit.serve import create_app`` works, but importing this package imports nothing heavy: FastAPI
and torch are loaded on first use of a name below, so ``import selfxit.serve`` stays cheap for the CLI.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "create_app": "selfxit.serve.app",
    "ApiError": "selfxit.serve.requests",
    "BundleLoader": "selfxit.serve.reload",
    "ServeConfig": "selfxit.serve.config",
    "ServedItem": "selfxit.serve.config",
    "TrafficLogger": "selfxit.serve.config",
    "NullTrafficLogger": "selfxit.serve.config",
    "MonitorConfig": "selfxit.serve.monitor",
    "TrafficMonitor": "selfxit.serve.monitor",
    "ray_app": "selfxit.serve.ray_serve",  # needs selfxit[ray]
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    """Import the module defining ``name`` on first access (PEP 562), so the package import stays light."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'selfxit.serve' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
