"""Where selfxit finds the shared material and keeps its cache (environment-overridable)."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The real test material: ``$SELFXIT_SHARED``, defaulting to ``../shared`` beside the project root."""
    return Path(os.environ.get("SELFXIT_SHARED", PROJECT_ROOT.parent / "shared")).expanduser()


def cache_dir() -> Path:
    """Downloads when the shared folder is absent: ``$SELFXIT_CACHE``, defaulting to ``~/.cache/selfxit``."""
    return Path(os.environ.get("SELFXIT_CACHE", Path.home() / ".cache" / "selfxit")).expanduser()
