"""``selfxit collect``: append a folder of images to a traffic log as if they had arrived as requests.

Backfill (log what the backbone says about a folder of images) or a simulated drifted stream
(``--transform blur|noise|brightness`` on a seeded share of the images). Nothing heavy is imported at
module level: ``selfxit --help`` must not import torch.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

from selfxit.cli.common import add_model_args, load_backbone

# the names of selfxit.ops.shift.SHIFTS, spelled out so that building the parser imports nothing heavy
# (tests/test_shift.py checks that the two agree)
SHIFT_NAMES = ("blur", "noise", "brightness")


def shift_seed(seed: int, index: int) -> int:
    """The per-image seed of a shift: independent streams for every (run seed, image position)."""
    import numpy as np
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _encoded_image(path: Path, kind: str | None, seed: int, strength: float | None) -> tuple[bytes, str]:
    """(bytes, content type) as the traffic would carry them: the file as is, or the shifted image as PNG.

    Decoded with the one image decoder (``selfxit.zoo.images``), so a file that serving or training
    would refuse is refused here too (CorruptImageError) and never logged.
    """
    import io

    from PIL import Image

    from selfxit.ops.shift import apply_shift
    from selfxit.zoo.images import image_header, open_rgb

    raw = path.read_bytes()
    rgb = open_rgb(raw, name=str(path))  # decodes every pixel: a truncated file fails here
    if kind is None:
        fmt, _, _ = image_header(raw, name=str(path))
        return raw, Image.MIME.get(fmt or "", "application/octet-stream")
    out = io.BytesIO()
    apply_shift(rgb, kind, seed, strength).save(out, format="PNG")
    return out.getvalue(), "image/png"


def run_collect(args) -> dict:
    """Log every image of ``--data`` (optionally shifted) with the backbone's softmax; returns the counts."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from selfxit.ops.shift import check_shift
    from selfxit.ops.signals import raise_on_signals
    from selfxit.ops.traffic import TrafficLog, TrafficLogError, TrafficRecord, record_input
    from selfxit.zoo.data import ImageFolderData
    from selfxit.zoo.images import CorruptImageError

    if not 0 < args.fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1]; got {args.fraction}")
    if args.transform is None and (args.fraction != 1 or args.strength is not None):
        raise ValueError("--fraction and --strength need --transform (one of: " + ", ".join(SHIFT_NAMES) + ")")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    strength = check_shift(args.transform, args.strength) if args.transform else None
    model, info = load_backbone(args)
    dataset = ImageFolderData(args.data, info, max_samples=args.max_samples, seed=args.seed)
    n = len(dataset)
    shifted = set()
    if args.transform:
        chosen = np.random.default_rng(args.seed).choice(n, max(1, round(args.fraction * n)), replace=False)
        shifted = set(chosen.tolist())
    if args.ray:
        return _collect_on_ray(args, model, info, dataset, shifted, strength)

    counts = {"records": 0, "shifted": 0, "corrupt": 0}
    pending: list = []

    def run_backbone(log: TrafficLog) -> None:
        with torch.inference_mode():
            probs = torch.softmax(model(torch.stack([x for _, x in pending])).float(), dim=1).numpy()
        now = time.time()
        for (record, _), p in zip(pending, probs):
            record.timestamp, record.backbone_probs, record.prediction = now, p, int(p.argmax())
            log.append(record)
        counts["records"] += len(pending)
        pending.clear()

    try:  # SIGTERM/SIGINT raise, so closing the log flushes what is buffered before the process ends
        with raise_on_signals(), TrafficLog(args.log) as log, tqdm(total=n, desc="collect", unit="img") as bar:
            if log.removed:
                bar.write(f"removed {len(log.removed)} file(s) left in {args.log} by writers that died")
            # in a seeded random order, as traffic arrives: file order is class order in an ImageFolder
            # layout, and retrain holds back the newest records, which must not be a few classes
            for i in np.random.default_rng(args.seed + 1).permutation(len(dataset.paths)).tolist():
                path = dataset.paths[i]
                kind = args.transform if i in shifted else None
                seed = shift_seed(args.seed, i)
                try:
                    encoded, content_type = _encoded_image(path, kind, seed, strength)
                    record = TrafficRecord(timestamp=0.0, encoded=encoded, content_type=content_type, exit="final",
                                           source="collect", meta={"file": str(path.relative_to(dataset.root)),
                                                                   "shift": kind, "shift_seed": seed if kind else None})
                    pending.append((record, record_input(record, info)))
                except (OSError, CorruptImageError) as e:
                    warnings.warn(f"skipping corrupt image {path}: {e}", stacklevel=2)
                    counts["corrupt"] += 1
                else:
                    counts["shifted"] += kind is not None
                if len(pending) >= args.batch_size:
                    run_backbone(log)
                bar.update(1)
            if pending:
                run_backbone(log)
    except TrafficLogError as e:
        raise RuntimeError(f"traffic log {args.log}: {e}") from e
    shift = f"{counts['shifted']} shifted by {args.transform} (strength {strength})" if args.transform else "no shift"
    print(f"collected {counts['records']} records into {args.log} ({shift}); "
          f"{counts['corrupt']} corrupt image(s) skipped")
    return counts


def _ray_encode(path: Path, index: int, root: Path, shifted: frozenset, kind: str | None, seed: int,
                strength: float | None) -> tuple[bytes, str, dict]:
    """One image's record bytes, content type and meta on a Ray actor: what the single-process loop logs."""
    kind = kind if index in shifted else None
    image_seed = shift_seed(seed, index)
    encoded, content_type = _encoded_image(path, kind, image_seed, strength)
    return encoded, content_type, {"file": str(path.relative_to(root)), "shift": kind,
                                   "shift_seed": image_seed if kind else None}


def _collect_on_ray(args, model, info, dataset, shifted: set, strength: float | None) -> dict:
    """``collect --ray``: the same records, computed by ``--replicas`` backbone actors (selfxit.ops.ray_jobs), each
    appending to its own shard of the log. Their timestamps interleave across actors; retrain orders by time."""
    import functools

    import numpy as np

    from selfxit.ops import ray_jobs
    from selfxit.ops.ray_cluster import connect, shutdown_at_exit
    if connect(args.address, args.ray_cpus, feature="selfxit collect --ray"):
        shutdown_at_exit()
    order = np.random.default_rng(args.seed + 1).permutation(len(dataset.paths)).tolist()
    encode = functools.partial(_ray_encode, root=dataset.root, shifted=frozenset(shifted), kind=args.transform,
                               seed=args.seed, strength=strength)
    counts = ray_jobs.collect_folder(model, info, [(dataset.paths[i], i) for i in order], args.log, encode,
                                     workers=args.replicas, batch_size=args.batch_size)
    counts["shifted"] = len(shifted)
    print(f"collected {counts['records']} records into {args.log} on {args.replicas} Ray actors "
          f"({len(shifted)} images shifted); {counts['corrupt']} corrupt image(s) skipped")
    return counts


def add_parser(sub) -> None:
    """Register the ``collect`` subcommand on an argparse ``sub`` (subparsers) object."""
    p = sub.add_parser("collect", help="append a folder of images to a traffic log, as if they were requests")
    add_model_args(p)
    p.add_argument("--data", required=True, help="image folder (ImageFolder layout or flat); labels are ignored")
    p.add_argument("--log", required=True, help="traffic log: a folder or an fsspec URL (e.g. s3://bucket/log)")
    p.add_argument("--transform", choices=SHIFT_NAMES, help="simulate drift: shift the images (re-encoded as PNG)")
    p.add_argument("--strength", type=float, help="shift strength (default per shift: blur radius 1 px, "
                                                  "noise std 0.1, brightness factor 1.5)")
    p.add_argument("--fraction", type=float, default=1.0, help="share of the images that get the shift (seeded)")
    p.add_argument("--max-samples", type=int, help="use a seeded random subset of the images")
    p.add_argument("--seed", type=int, default=0, help="seeds the subset, the shifted share and the noise")
    p.add_argument("--batch-size", type=int, default=64, help="images per backbone run")
    from selfxit.cli.retrain import add_ray_args
    add_ray_args(p, "backbone actors logging the images, each to its own shard of the log")
    p.set_defaults(func=run_collect)


