"""Optional extras: which pip extra brings which libraries, and the error that names the install to run.

``pip install selfxit`` gives wrap, collect, fit, evaluate, save, load and run. The heavy libraries
come with extras: ``search`` (NNI), ``serve`` (FastAPI, uvicorn, prometheus-client), ``report``
(matplotlib), ``flops`` (DeepSpeed's FLOP counter, used when a bundle is built; without it torch's
counter is used), ``ray`` (Ray Serve replicas and the distributed nightly job) and ``all``.
"""
from __future__ import annotations

import importlib
import os

EXTRAS = {
    "search": ("nni",),
    "serve": ("fastapi", "uvicorn", "python_multipart", "prometheus_client"),
    "report": ("matplotlib",),
    "flops": ("deepspeed",),
    "ray": ("ray", "ray.serve", "ray.data"),
}


class MissingExtraError(ImportError):
    """A feature whose optional libraries are not installed; the message says what to pip install."""


def require_extra(extra: str, feature: str | None = None) -> None:
    """Raise :class:`MissingExtraError` unless every library of ``extra`` imports."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; extras are {sorted(EXTRAS)}")
    os.environ.setdefault("NNI_FRAMEWORK", "none")  # NNI must not look for pytorch-lightning at import
    missing = []
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingExtraError(f"{feature or extra} needs the optional libraries {', '.join(missing)}: "
                                f"pip install 'selfxit[{extra}]' (or 'selfxit[all]')")
