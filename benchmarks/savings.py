"""More savings at the same tolerance (issue 14): today's default against cascaded, ensembled and
survivor-aware heads on the shared ResNet-56, certified, measured on the held-back test split.

    .venv/bin/python benchmarks/savings.py [--work DIR] [--seeds 0] [--max-samples 5000] [--model cifar_resnet56]
                                           [--pieces default,cascade,survivor,all] [--drift] [--json OUT]

The medial dataset is recorded once per (seed, sample count) with selfxit's own ``collect`` and kept
under ``--work`` (``medial-s<seed>-n<count>``), so reruns skip it. For each piece and tolerance (1%, 5%)
it prints flops_fraction, agreement, ground-truth accuracy, the latency ratios at batch 1 and 32
(early exit / plain backbone, measured in the same run) and the wall time of the fit (plus, once,
the recording: ``enable`` = collect + fit).

Pieces (all opt-in ``FitConfig`` fields; see ``selfxit/fit/cascade.py``):

- ``default``: today's ``FitConfig()``;
- ``cascade``: ``FitConfig(cascade=True)``: Zero Time Waste's cascade connections and geometric
  ensembles on the exits of the default design;
- ``survivor``: ``cascade=True, survivor_rounds=2``: the chain's heads re-weighted toward the train
  samples that reach them, alternated with the cascade design on *tune*;
- ``all``: both (the same as ``survivor``, which includes the cascade);
- ``cascade_tune_ensemble``: ``cascade=True, ensemble_split="tune"``: the ensemble weights fitted on *tune*;
- ``cascade_all_heads``: a measurement only: a chain over every trained head;
- ``cap3``, ``cap5``, ``uncapped``: today's ``FitConfig()`` with at most 3 or 5 active exits, or no cap (the
  default is 4);
- ``kd_t2``, ``kd_t4``, ``epochs30``, ``hidden512``, ``pool2``, ``conv_late``: the default heads trained otherwise (on the default medial
  dataset, each piece its own heads, trained once and reused at the next tolerance): KD temperature 2 or 4
  (``DistillConfig.temperature``), 30 epochs instead of 15, a 512-wide hidden layer instead of 256; ``pool2``: maps
  pooled to 2x2 instead of 4x4 (a quarter of the first layer's weights: the heads' fixed CPU cost); ``conv_late``
  (ResNet-56): a conv head (64 channels, 3x3, then 2x2 pooling and the MLP) at ``layer3.1/3.3/3.6``;
- ``mixup``, ``cutmix``, ``jitter``, ``augment_all`` (today's ``FitConfig()`` on a medial dataset recorded with
  more label-free train rows, :class:`selfxit.fit.augment.AugmentConfig`): one mixup copy, one cutmix copy, colour
  jitter 0.4 on the copies, or all three, each besides the 2 flip/shift copies of the default; ``copies3``: a
  third flip/shift copy (as many rows as ``mixup``: more rows, without mixing); ``augment_all_cap3``,
  ``augment_all_uncapped``: ``augment_all`` with at most 3 exits or no cap.

A piece with its own augmentation records its own medial dataset (``medial-s<seed>-n<count>-<augmentation>``) and
trains its own heads; its rows report ``record_seconds`` and ``heads_seconds`` of that dataset, so
``enable`` = record + heads + fit for each. ``--model`` picks the shared backbone (``cifar_resnet56``, default, or
``cifar_resnet20``).

``--drift`` (part B of the issue, measurement only): fine-tunes a copy of the backbone by KL to the
original on the train images (frozen BatchNorm statistics, L2-SP, final KL weighted high) and reports
how often the copy's final answer agrees with the original's on the test split: the drift that a mixed
regime's final exit would start from, before any exit fires.

``--mixed`` (part B end to end, every seed; ``drift_copy.measure_mixed``): the mixed regime from the default heads
of the seed, warm-started. Each setting of ``drift_copy.JOINTS`` (``--mixed-settings`` picks some) copies the
backbone and the heads, fine-tunes both on the *train* images by KL to the original, recalibrates on *tune* and
certifies on *val* with the copy's final answers counted (the promise covers them: a mixed bundle answers with the
copy where no head fires). The frozen row is the same heads on the original, certified by the same code. Each row
gives the copy's final agreement with the original and, per tolerance, flops_fraction and agreement on *test*.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NNI_FRAMEWORK", "none")

import selfxit  # noqa: E402
from selfxit.evaluate.evaluation import evaluate  # noqa: E402
from selfxit.fit import cascade as chaining  # noqa: E402
from selfxit.fit.augment import AugmentConfig  # noqa: E402
from selfxit.fit.config import FitConfig  # noqa: E402
from selfxit.fit.distill import DistillConfig  # noqa: E402
from selfxit.fit.medial import MedialDataset  # noqa: E402
from selfxit.zoo import load_backbone  # noqa: E402
from selfxit.zoo.data import ImageFolderData, default_traffic_dir, split_indices  # noqa: E402

PIECES = {
    "default": {},
    "cascade": {"cascade": True},
    "survivor": {"cascade": True, "survivor_rounds": 2},
}
PIECES["all"] = dict(PIECES["survivor"])
# the ensemble fitted on tune, not train (FitConfig.ensemble_split); and, as a measurement only, a chain over
# every trained head (the members that do not answer run at their counted cost)
PIECES["cascade_tune_ensemble"] = {"cascade": True, "ensemble_split": "tune"}
PIECES["cascade_all_heads"] = dict(PIECES["cascade"])
# the cap on active exits (FitConfig.max_exits, default 4): the old default, one more, and none
PIECES["cap3"] = {"max_exits": 3}
PIECES["cap5"] = {"max_exits": 5}
PIECES["uncapped"] = {"max_exits": None}
# the heads trained otherwise on the default medial dataset: each such piece trains its own heads once
HEAD_PIECES = {"kd_t2": {"distill": DistillConfig(temperature=2.0)}, "kd_t4": {"distill": DistillConfig(temperature=4.0)},
               "epochs30": {"distill": DistillConfig(epochs=30)},
               "hidden512": {"heads": {"kind": "pool_mlp", "pool": 4, "hidden": [512]}},
               "pool2": {"heads": {"kind": "pool_mlp", "pool": 2, "hidden": [256]}},
               # ResNet-56 only: conv heads (head_ceiling.py's CONV_HEAD) at the three layer3 candidates, default elsewhere
               "conv_late": {"heads": {layer: {"kind": "conv_linear", "convs": [{"out": 64, "kernel": 3, "stride": 1}],
                                               "pool": 2, "hidden": [256]} for layer in ("layer3.1", "layer3.3", "layer3.6")}}}
PIECES.update(HEAD_PIECES)
# label-free augmentation of the train rows (recorded, so each gets its own medial dataset and heads): piece ->
# AugmentConfig; every other piece records the default (2 flip/shift copies)
AUGMENTATIONS = {
    "mixup": AugmentConfig(mixup=1),
    "cutmix": AugmentConfig(cutmix=1),
    "jitter": AugmentConfig(jitter=0.4),
    "augment_all": AugmentConfig(mixup=1, cutmix=1, jitter=0.4),
    "copies3": AugmentConfig(copies=3),
}
for _piece in AUGMENTATIONS:
    PIECES[_piece] = {}
# the three augmentations with another cap on active exits (with --keep-medial they reuse augment_all's heads)
AUGMENTATIONS["augment_all_cap3"] = AUGMENTATIONS["augment_all_uncapped"] = AUGMENTATIONS["augment_all"]
PIECES["augment_all_cap3"], PIECES["augment_all_uncapped"] = {"max_exits": 3}, {"max_exits": None}


@contextlib.contextmanager
def variant(piece: str):
    """Patch selfxit.fit.cascade for the measurement-only pieces above, for the duration of one fit."""
    original_members = chaining.chain_members
    if piece == "cascade_all_heads":
        chaining.chain_members = lambda layers, thresholds, shape: list(layers)
    try:
        yield
    finally:
        chaining.chain_members = original_members
TARGETS = {0.01: 0.80, 0.05: 0.64}  # issue 14, frozen regime: tolerance -> flops_fraction


def medial_folder(work: Path, model: str, seed: int, count: int, augmentation: AugmentConfig) -> Path:
    """Where the medial dataset of one (model, seed, sample count, augmentation) is kept."""
    name = f"medial-s{seed}-n{count}" + ("" if model == "cifar_resnet56" else f"-{model}")
    if augmentation != AugmentConfig():
        a = augmentation
        name += f"-c{a.copies}m{a.mixup}x{a.cutmix}j{a.jitter:g}"
    return work / name


def medial_for(ee, traffic, seed: int, folder: Path, augmentation: AugmentConfig) -> tuple[MedialDataset, float]:
    """The medial dataset of ``traffic`` for ``seed``, recorded once into ``folder`` (seconds spent recording)."""
    if (folder / "complete").is_file():
        medial = MedialDataset(folder)
        if medial.candidates != [c.name for c in ee.candidates]:
            raise SystemExit(f"{folder} holds candidates {medial.candidates}; delete it to record again")
        ee.medial = medial
        return medial, float((folder / "complete").read_text())
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(traffic, batch_size=256)
    medial = ee.collect(loader, out_dir=folder, seed=seed, augment_copies=augmentation, progress=False)
    seconds = time.perf_counter() - start
    (folder / "complete").write_text(f"{seconds:.1f}")
    return medial, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/selfxit-savings"))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--max-samples", type=int, default=5000)
    parser.add_argument("--tolerances", default="0.01,0.05")
    parser.add_argument("--pieces", default="default,cascade,survivor")
    parser.add_argument("--latency-samples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--record-only", action="store_true", help="record the medial datasets and stop")
    parser.add_argument("--drift", action="store_true", help="also measure part B's drift of a fine-tuned copy")
    parser.add_argument("--drift-epochs", type=int, default=2)
    parser.add_argument("--drift-settings", default="-1,0,1,2",
                        help="which of drift_copy.SETTINGS to run (-1: the frozen-regime heads)")
    parser.add_argument("--drift-images", type=int, default=3000, help="train images the copy is fine-tuned on")
    parser.add_argument("--drift-layers", default="", help="exit layers of the drift heads (default: the default "
                                                              "piece's exits at 1%%)")
    parser.add_argument("--mixed", action="store_true",
                        help="part B end to end: the mixed regime from the default heads, certified (every seed)")
    parser.add_argument("--mixed-settings", default="",
                        help="which of drift_copy.JOINTS to run with --mixed (default: all)")
    parser.add_argument("--mixed-epochs", type=int, default=None, help="override each joint setting's epochs")
    parser.add_argument("--model", default="cifar_resnet56", choices=["cifar_resnet56", "cifar_resnet20"])
    parser.add_argument("--keep-medial", action="store_true",
                        help="keep the augmented pieces' medial datasets (default: removed after their piece)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pieces = [p for p in args.pieces.split(",") if p]
    # the pieces on the default medial dataset first (they share its heads), then each augmented one on its own
    pieces = [p for p in pieces if p not in AUGMENTATIONS] + [p for p in pieces if p in AUGMENTATIONS]
    unknown = sorted(set(pieces) - set(PIECES))
    if unknown:
        raise SystemExit(f"--pieces: unknown {unknown}; choose from {sorted(PIECES)}")
    if args.mixed and "default" not in pieces and any(p in AUGMENTATIONS for p in pieces):
        raise SystemExit("--mixed starts from the default heads: add the 'default' piece when augmented pieces run")
    tolerances = [float(t) for t in args.tolerances.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {"max_samples": args.max_samples, "seeds": {}}
    model, info = load_backbone(args.model)
    for seed in [int(s) for s in args.seeds.split(",")]:
        traffic = ImageFolderData(default_traffic_dir(), info, max_samples=args.max_samples, seed=seed)
        ee = selfxit.wrap(model, torch.zeros(1, *info.input_size))
        default_folder = medial_folder(args.work, args.model, seed, len(traffic), AugmentConfig())
        medial, record_s = medial_for(ee, traffic, seed, default_folder, AugmentConfig())
        print(f"seed {seed}: {len(traffic)} images, medial recorded in {record_s:.0f} s", flush=True)
        if args.record_only:
            continue
        test = torch.utils.data.Subset(traffic, split_indices(len(traffic), seed)["test"].tolist())
        test_loader = torch.utils.data.DataLoader(test, batch_size=64)
        runs = results["seeds"].setdefault(str(seed), {"record_seconds": record_s})
        base: list = []  # the independent heads of the first fit, reused by every piece (as enable would train them)
        own: dict = {}  # HEAD_PIECES: piece -> its own heads, trained at its first tolerance
        default_heads: list = []  # the default piece's heads: what --mixed starts from
        recorded: AugmentConfig | None = AugmentConfig()  # the augmentation of the medial dataset ee holds
        for piece in pieces:
            augmentation = AUGMENTATIONS.get(piece, AugmentConfig())
            if augmentation != recorded:  # another medial dataset: record it (or read it back) and train its heads
                folder = medial_folder(args.work, args.model, seed, len(traffic), augmentation)
                medial, piece_record_s = medial_for(ee, traffic, seed, folder, augmentation)
                print(f"  {piece}: medial {augmentation} ({medial.meta.num_samples} rows) recorded in "
                      f"{piece_record_s:.0f} s", flush=True)
                recorded, base = augmentation, []
            for tolerance in tolerances:
                settings = dict(PIECES[piece])
                if piece in own:
                    ee.set_records(own[piece])
                elif piece in HEAD_PIECES:
                    settings["retrain"] = True  # its own heads, not the default ones held now
                elif base:
                    ee.set_records(base)
                start = time.perf_counter()
                with variant(piece):
                    report = ee.fit(tolerance, config=FitConfig(**settings), progress=False)
                fit_s = time.perf_counter() - start
                trained_heads = (not base and piece not in own) or settings.get("retrain", False)
                if piece in HEAD_PIECES and piece not in own:
                    own[piece] = [dataclasses.replace(r, threshold=None) for r in ee.records.values()]
                if piece == "default" and not default_heads:
                    default_heads = [dataclasses.replace(r, threshold=None) for r in ee.records.values()]
                if not base and piece not in HEAD_PIECES:
                    base = [dataclasses.replace(r, threshold=None) for r in ee.records.values()]
                    if augmentation == AugmentConfig():
                        runs["heads_seconds"] = fit_s  # training the independent heads, counted once in enable
                result = evaluate(ee, test_loader, latency_samples=args.latency_samples, progress=False)
                row = {"flops_fraction": result.flops_fraction, "agreement": result.agreement,
                       "accuracy": result.accuracy_early_exit, "accuracy_backbone": result.accuracy_backbone,
                       "latency_b1": result.latency_ratio_b1, "latency_b32": result.latency_ratio_b32,
                       "fit_seconds": fit_s, "exits": {k: v for k, v in result.exit_rates.items()},
                       "test_recorded": asdict(report.chosen_test) if report.chosen_test else None,
                       "augmentation": augmentation.to_dict(), "rows": ee.medial.meta.num_samples,
                       "trained_heads": trained_heads}
                if augmentation != AugmentConfig():  # enable = record + heads + fit of this piece's own dataset
                    row["record_seconds"] = piece_record_s
                row["per_exit"] = per_exit(ee, test_loader, tolerance)
                runs[f"{piece}@{tolerance:g}"] = row
                print(f"  {piece:<9} T={tolerance:<5g} flops {row['flops_fraction']:.3f}  agreement "
                      f"{row['agreement']:.4f}  accuracy {row['accuracy']:.3f} (backbone "
                      f"{row['accuracy_backbone']:.3f})  latency b1 {row['latency_b1']:.3f} b32 "
                      f"{row['latency_b32']:.3f}  fit {fit_s:.0f} s  exits "
                      f"{ {k: round(v, 3) for k, v in row['exits'].items() if v} }", flush=True)
                print("            per exit (test, hindsight cover at T): " + ", ".join(
                    f"{k} agree {v['agreement']:.3f} cover {v['cover']:.3f}" for k, v in row["per_exit"].items()))
            if augmentation != AugmentConfig() and not args.keep_medial:
                medial.close()  # the next piece records its own dataset (the augmented pieces come last)
                shutil.rmtree(folder, ignore_errors=True)
                recorded = None  # gone: a next piece with the same augmentation records it again
        if args.drift and seed == int(args.seeds.split(",")[0]):  # part B on the first seed only (it is costly)
            from drift_copy import measure_drift  # benchmarks/drift_copy.py

            layers = [k for k in args.drift_layers.split(",") if k] or \
                [k for k in runs.get("default@0.01", {}).get("exits", {}) if k != "final"]
            if not layers:
                raise SystemExit("--drift needs the default piece at 1% (its exits are the heads) or --drift-layers")
            from drift_copy import SETTINGS

            chosen = [int(i) for i in args.drift_settings.split(",") if i]
            runs["drift"] = measure_drift(model, traffic, seed, layers, epochs=args.drift_epochs,
                                          max_train=args.drift_images, frozen=-1 in chosen,
                                          settings=[SETTINGS[i] for i in chosen if i >= 0])
        if args.mixed:
            runs["mixed"] = _mixed(ee, traffic, seed, default_heads, tolerances, args)
    _summary(results, pieces, tolerances)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))


def _mixed(ee, traffic, seed: int, default_heads: list, tolerances: list[float], args) -> dict:
    """Part B end to end (``drift_copy.measure_mixed``) from the default heads of this seed (trained here if the
    default piece did not run)."""
    from drift_copy import JOINTS, measure_mixed  # benchmarks/drift_copy.py

    if default_heads:
        ee.set_records(default_heads)
    else:
        ee.fit(tolerances[0], config=FitConfig(retrain=True), progress=False)
    joints = [JOINTS[int(i)] for i in args.mixed_settings.split(",") if i] or list(JOINTS)
    if args.mixed_epochs is not None:
        joints = [dataclasses.replace(j, epochs=args.mixed_epochs) for j in joints]
    return measure_mixed(ee, traffic, seed, tolerances, joints)


def per_exit(ee, loader, tolerance: float) -> dict:
    """Each active exit's agreement with the backbone on the test split and its hindsight coverage at
    ``tolerance`` (most confident first, as ``benchmarks/head_ceiling.py``): what the heads themselves allow,
    whatever the thresholds. One no-shrink pass, so every exit sees every sample."""
    from head_ceiling import hindsight_coverage  # benchmarks/head_ceiling.py

    preds, confs, tops = [], [], []
    with torch.inference_mode():
        for batch in loader:
            x = batch[0]
            out = ee(x, shrink=False)
            if out.exit_predictions is None:
                return {}
            preds.append(out.exit_predictions)
            confs.append(out.exit_confidence)
            tops.append(ee.backbone(x).argmax(1))
    if not preds or not len(preds[0]):
        return {}
    pred, conf, top = torch.cat(preds, 1), torch.cat(confs, 1), torch.cat(tops)
    agree = (pred == top[None]).numpy()
    return {layer: {"agreement": float(agree[k].mean()),
                    "cover": hindsight_coverage(conf[k].numpy(), agree[k], tolerance)}
            for k, layer in enumerate(ee.thresholds)}


def _summary(results: dict, pieces: list[str], tolerances: list[float]) -> None:
    """Mean over the seeds run of each piece and tolerance, against the issue's targets."""
    seeds = results["seeds"]
    if not seeds:
        return
    print(f"\nmean of {len(seeds)} seed(s):")
    for piece in pieces:
        for tol in tolerances:
            rows = [s[f"{piece}@{tol:g}"] for s in seeds.values() if f"{piece}@{tol:g}" in s]
            if not rows:
                continue
            mean = {k: float(np.mean([r[k] for r in rows])) for k in
                    ("flops_fraction", "agreement", "accuracy", "latency_b1", "latency_b32", "fit_seconds")}
            target = TARGETS.get(tol)
            met = target is not None and mean["flops_fraction"] <= target and mean["agreement"] >= 1 - tol
            print(f"  {piece:<9} T={tol:<5g} flops {mean['flops_fraction']:.3f} agreement {mean['agreement']:.4f} "
                  f"accuracy {mean['accuracy']:.3f} latency b1/b32 {mean['latency_b1']:.3f}/{mean['latency_b32']:.3f} "
                  f"fit {mean['fit_seconds']:.0f} s  target flops <= {target}: {'met' if met else 'not met'}")


if __name__ == "__main__":
    main()
