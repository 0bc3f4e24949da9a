"""Exit bundles on disk: heads (and gates) as safetensors plus a JSON manifest, written atomically.

Format 2 (written now) keeps one entry per exit in ``manifest["exits"]`` (layer, activation shape, head
spec, temperature, head FLOPs, threshold or null, gate spec or null; ``chain`` for a chained exit of
:mod:`selfxit.core.cascade`, absent otherwise, so older bundles read unchanged) and a typed ``provenance``. Format 1
(parallel ``heads``/``exits``/``gates`` sections and a free-form ``meta``) is still read.
Loading needs only this package's core: never NNI, DeepSpeed or a web framework.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from selfxit.core import atomic
from selfxit.core.candidates import Candidate
from selfxit.core.cascade import from_config as chained_from_config
from selfxit.core.cascade import is_chained
from selfxit.core.conformal import ConformalCalibration
from selfxit.core.exits import CertifiedFamily, ExitRecord
from selfxit.core.flops import counter_name
from selfxit.core.gates import build_gate
from selfxit.core.heads import build_head, concrete_spec
from selfxit.core.provenance import Provenance

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
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
    tensors = {f"{layer}/{key}": t.detach().cpu().contiguous() for layer, sd in heads.items() for key, t in sd.items()}
    with atomic.staged_dir(path) as staging:
        save_file(tensors, staging / WEIGHTS)
        (staging / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, **manifest}, indent=2))
    return Path(path)


def load_bundle(path: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """Read a bundle: (manifest, {layer: head state dict})."""
    path = Path(path)
    if not (path / MANIFEST).exists():
        raise BundleError(f"{path} is not a selfxit bundle (no {MANIFEST}); create one with `selfxit enable`")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path / MANIFEST} is not valid JSON: {exc}") from exc
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise BundleError(f"{path}: bundle format {manifest.get('format_version')} is not one this version reads "
                          f"{READABLE_VERSIONS}; upgrade selfxit or rebuild the bundle")
    try:
        tensors = load_file(path / WEIGHTS)
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise BundleError(f"{path / WEIGHTS} cannot be read: {exc}") from exc
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        layer, _, name = key.rpartition("/")
        heads.setdefault(layer, {})[name] = tensor
    return manifest, heads


class BundleContents(NamedTuple):
    """What a bundle holds for :func:`selfxit.load`, rebuilt and checked against the backbone."""

    input_shape: tuple[int, ...]
    num_classes: int
    candidates: list[Candidate]
    backbone_flops: int
    records: list[ExitRecord]
    gate: str
    conformal: ConformalCalibration | None
    tolerance: float | None
    provenance: Provenance
    family: CertifiedFamily | None  # None for bundles fitted without 'certified' (or before format 2)


def save_model(ee, path: str | Path) -> Path:
    """Write an :class:`selfxit.api.EarlyExitModel`'s exit records and what they were fitted with (format 2)."""
    manifest = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "backbone_fingerprint": backbone_fingerprint(ee.backbone),
        "input_shape": list(ee.input_shape),
        "num_classes": ee.num_classes,
        "backbone_flops": ee.backbone_flops,
        "flops_counter": counter_name(),
        "candidates": [c.to_dict() for c in ee.candidates],
        "gate": ee.gate,
        "exits": [{"layer": r.layer, "shape": list(r.shape), "spec": r.spec, "temperature": r.temperature,
                   "head_flops": r.head_flops, "threshold": r.threshold,
                   "gate": r.gate.spec() if r.gate is not None else None,
                   **({"chain": r.head.config()} if is_chained(r.head) else {})} for r in ee.records.values()],
        "conformal": ee.conformal.to_dict() if ee.conformal else None,
        "tolerance": ee.tolerance,
        "certified_family": ee.family.to_dict() if getattr(ee, "family", None) is not None else None,
        "config": ee.config.to_dict() if getattr(ee, "config", None) is not None else None,
        "report": asdict(ee.report) if ee.report else None,
        "provenance": ee.provenance.to_dict(),
    }
    weights = {r.layer: r.head.state_dict() for r in ee.records.values()}
    weights.update({f"gate:{r.layer}": r.gate.state_dict() for r in ee.records.values() if r.gate is not None})
    return save_bundle(path, manifest, weights)


def _exit_entries(manifest: dict) -> list[dict]:
    """Format-2 exit entries; a format-1 manifest's parallel sections are folded into them."""
    if manifest["format_version"] >= 2:
        return manifest["exits"]
    thresholds = {e["layer"]: e["threshold"] for e in manifest.get("exits", [])}
    gates = manifest.get("gates") or {}
    return [{"layer": name, "shape": info["shape"], "spec": info["spec"], "temperature": info["temperature"],
             "head_flops": info["head_flops"], "threshold": thresholds.get(name), "gate": gates.get(name)}
            for name, info in manifest["heads"].items()]


def read_model(path: str | Path, model: nn.Module) -> BundleContents:
    """Read a bundle for ``model``: refuses a bundle built for a different backbone, or one whose weights do
    not match its specs, with a :class:`BundleError` that says what to do."""
    manifest, states = load_bundle(path)
    fingerprint = backbone_fingerprint(model)
    if manifest.get("backbone_fingerprint") != fingerprint:
        raise BundleError(f"bundle {path} was built for backbone {manifest.get('backbone_fingerprint', '?')[:12]}, "
                          f"but this model is {fingerprint[:12]}: use the same weights, or rebuild the bundle")
    try:
        num_classes = int(manifest["num_classes"])
        candidates = [Candidate(c["name"], tuple(c["shape"]), int(c["remaining_flops"])) for c in manifest["candidates"]]
        entries = _exit_entries(manifest)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"bundle {path}: manifest lacks or garbles {exc}; rebuild the bundle") from exc
    records = []
    for e in entries:
        name, shape = e["layer"], tuple(e["shape"])
        try:
            spec = concrete_spec(e["spec"], shape)
            head: nn.Module = build_head(spec, shape, num_classes)
            if e.get("chain") is not None:  # a chained exit (selfxit.core.cascade): the head inside its chain module
                head = chained_from_config(head, num_classes, e["chain"])
            head.load_state_dict(states[name])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise BundleError(f"bundle {path}: weights of head {name!r} do not match its spec: {exc}") from exc
        gate = None
        if e.get("gate") is not None:
            try:
                gate = build_gate(e["gate"])
                gate.load_state_dict(states[f"gate:{name}"])
            except (KeyError, RuntimeError, ValueError) as exc:
                raise BundleError(f"bundle {path}: gate of exit {name!r} cannot be rebuilt: {exc}") from exc
            gate.eval()
        threshold = e.get("threshold")
        records.append(ExitRecord(name, head.eval(), float(e["temperature"]),
                                  None if threshold is None else float(threshold), gate, spec, shape,
                                  int(e["head_flops"])))
    raw_conformal = manifest.get("conformal")
    return BundleContents(tuple(manifest["input_shape"]), num_classes, candidates, int(manifest["backbone_flops"]),
                          records, manifest.get("gate", "confidence"),
                          ConformalCalibration.from_dict(raw_conformal) if raw_conformal else None,
                          manifest.get("tolerance"), Provenance.from_dict(manifest.get("provenance", manifest.get("meta"))),
                          CertifiedFamily.from_dict(manifest["certified_family"]) if manifest.get("certified_family")
                          else None)
