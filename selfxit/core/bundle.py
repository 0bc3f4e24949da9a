"""Exit bundles on disk: heads as safetensors plus a JSON manifest, written atomically."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "heads.safetensors"


class BundleError(ValueError):
    """A bundle that cannot be used: missing, corrupt, or made for another backbone."""


def backbone_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the backbone's state (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_bundle(path: str | Path, manifest: dict, heads: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Write ``manifest`` and each head's state dict to ``path`` atomically.

    Everything is written into a temporary sibling folder first and renamed into place, so a reader
    (or a crash) never sees a half-written bundle. An existing bundle at ``path`` is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{layer}/{key}": t.detach().cpu().contiguous() for layer, sd in heads.items() for key, t in sd.items()}
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700; a bundle should read like any other folder
    old = path.with_name(f".{path.name}.old")
    try:
        save_file(tensors, staging / WEIGHTS)
        (staging / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, **manifest}, indent=2))
        for f in staging.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)  # put the previous bundle back
        raise
    return path


def load_bundle(path: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """Read a bundle: (manifest, {layer: head state dict})."""
    path = Path(path)
    if not (path / MANIFEST).exists():
        raise BundleError(f"{path} is not a selfxit bundle (no {MANIFEST}); create one with `selfxit enable`")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path / MANIFEST} is not valid JSON: {exc}") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {manifest.get('format_version')} is not {FORMAT_VERSION}")
    try:
        tensors = load_file(path / WEIGHTS)
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise BundleError(f"{path / WEIGHTS} cannot be read: {exc}") from exc
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        layer, _, name = key.rpartition("/")
        heads.setdefault(layer, {})[name] = tensor
    return manifest, heads
