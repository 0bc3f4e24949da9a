"""What limits early exits on the shared ResNet-56: how well each exit head agrees with the backbone, and how
many samples it could answer within a tolerance even if its threshold were tuned on the test split itself.

    .venv/bin/python benchmarks/head_ceiling.py [--medial DIR] [--variants layer2.0,layer3.3] [--threads 2]

``--medial`` reuses a medial dataset of ResNet-56 recorded on all shared images with seed 0 (else one is
recorded into a temporary folder, ~2 min). Per candidate layer, a default head is distilled on *train*,
temperature-scaled on *tune*, and measured on the held-back *test* split:

- ``agreement``: top-1 agreement with the backbone;
- ``auroc``: how well its calibrated max-softmax ranks agreeing samples above disagreeing ones;
- ``cover@tol``: the largest fraction of test samples it can answer, most confident first, while the
  disagreements among them stay within ``tol`` of all samples (hindsight: not achievable by any threshold
  chosen without the test labels of agreement);
- ``flops@tol``: the FLOPs fraction of a single exit there with that coverage;
- ``rich``: ``cover@tol`` when samples are ranked by a logistic gate that reads every exit so far
  (max probability, entropy, probability of this exit's top-1, agreement with it), fitted on tune + val;
- ``need@F``: the coverage this exit alone would need for a FLOPs fraction of F (the learned-gate targets:
  0.70 at 1%, 0.55 at 5%).

``--variants`` also trains, on those layers, the default head without the augmented copies and a
conv head (the best of issue 3's space tried by hand), to show how much head capacity and data move it.
Timing: ~2 min for the default heads, ~3 min more per variant layer on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NNI_FRAMEWORK", "none")

import selfxit  # noqa: E402
from selfxit.core.flops import count_flops  # noqa: E402
from selfxit.core.heads import DEFAULT_HEAD, build_head  # noqa: E402
from selfxit.fit.calibrate import fit_temperature  # noqa: E402
from selfxit.fit.distill import DistillConfig, distill_head, head_logits  # noqa: E402
from selfxit.fit.medial import MedialDataset  # noqa: E402
from selfxit.zoo import load_backbone  # noqa: E402
from selfxit.zoo.data import ImageFolderData, default_traffic_dir  # noqa: E402

TARGETS = {0.01: 0.70, 0.05: 0.55}  # issue 7's learned-gate targets: tolerance -> flops_fraction
CONV_HEAD = {"kind": "conv_linear", "convs": [{"out": 64, "kernel": 3, "stride": 1}], "pool": 2, "hidden": [256]}


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean labels ``positive`` (Mann-Whitney, ties halved)."""
    positive = positive.astype(bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    start = 0
    for end in range(1, len(scores) + 1):  # average ranks over ties
        if end == len(scores) or sorted_scores[end] != sorted_scores[start]:
            ranks[order[start:end]] = (start + end + 1) / 2
            start = end
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def hindsight_coverage(confidence: np.ndarray, agree: np.ndarray, tolerance: float) -> float:
    """Largest fraction answered, most confident first, with disagreements <= tolerance * all samples."""
    wrong = np.cumsum(~agree.astype(bool)[np.argsort(-confidence, kind="mergesort")])
    return float(np.searchsorted(wrong, tolerance * len(agree), side="right") / len(agree))


def rich_features(log_probs: list[torch.Tensor]) -> torch.Tensor:
    """[N, 4K] features of the last of K exits from all K: each one's max probability, entropy, probability of
    the last exit's top-1 and whether its own top-1 is that class."""
    stacked = torch.stack(log_probs)  # [K, N, C]
    probs = stacked.exp()
    top = stacked[-1].argmax(1)
    of_top = probs.gather(2, top[None, :, None].expand(len(log_probs), -1, 1))[..., 0]
    columns = [probs.amax(2), -(probs * stacked).sum(2), of_top, (stacked.argmax(2) == top).float()]
    return torch.cat([c.T for c in columns], dim=1)


def rich_gate_scores(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor) -> np.ndarray:
    """Agreement probability from an L2-regularised logistic regression on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    x = (train_x - mean) / std
    weight = torch.zeros(x.shape[1] + 1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = x @ weight[:-1] + weight[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, train_y) + 1e-3 * weight[:-1].square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return torch.sigmoid((test_x - mean) / std @ weight[:-1] + weight[-1]).numpy()


def measure(medial: MedialDataset, layer: str, spec: dict, train_rows: np.ndarray, exit_cost: float,
            head_cost: float, tolerances) -> dict:
    """Train one head on ``train_rows`` and measure it on the test split (see the module docstring)."""
    shape = medial.meta.shapes[medial.candidates.index(layer)]
    torch.manual_seed(0)
    head = distill_head(build_head(spec, shape, medial.meta.num_classes), medial, layer, train_rows,
                        DistillConfig(), progress=False)
    tune, test = medial.indices("tune"), medial.indices("test")
    temperature = fit_temperature(head_logits(head, medial, layer, tune), medial.teacher(tune).argmax(1))
    probs = (head_logits(head, medial, layer, test) / temperature).softmax(1)
    top1 = medial.teacher(test).argmax(1)
    agree = (probs.argmax(1) == top1).numpy()
    confidence = probs.max(1).values.numpy()
    row = {"agreement": float(agree.mean()), "auroc": auroc(confidence, agree),
           "log_probs": {split: (head_logits(head, medial, layer, medial.indices(split)) / temperature).log_softmax(1)
                         for split in ("tune", "val", "test")}}
    for tol in tolerances:
        cover = hindsight_coverage(confidence, agree, tol)
        row[f"cover@{tol:g}"] = cover
        row[f"flops@{tol:g}"] = cover * exit_cost + (1 - cover) * (1 + head_cost)
        target = TARGETS.get(tol)
        if target is not None:  # cover * exit_cost + (1 - cover) * (1 + head_cost) = target
            need = (1 + head_cost - target) / (1 + head_cost - exit_cost)
            row[f"need@{target:g}"] = need if 0 <= need <= 1 else float("inf")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--medial", type=Path, help="recorded medial dataset of ResNet-56 on all shared images")
    parser.add_argument("--variants", default="layer2.0,layer3.3",
                        help="layers on which to also train the no-augmentation and conv-head variants ('' for none)")
    parser.add_argument("--tolerances", default="0.01,0.05")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tolerances = [float(t) for t in args.tolerances.split(",")]

    model, info = load_backbone("cifar_resnet56")
    ee = selfxit.wrap(model, torch.zeros(1, *info.input_size))
    tmp = None
    if args.medial:
        medial = MedialDataset(args.medial)
        if medial.candidates != [c.name for c in ee.candidates] or medial.meta.seed != args.seed:
            raise SystemExit(f"{args.medial} holds candidates {medial.candidates} (seed {medial.meta.seed}); this "
                             f"run needs {[c.name for c in ee.candidates]}, seed {args.seed}")
    else:
        tmp = Path(tempfile.mkdtemp(prefix="selfxit-ceiling-"))
        traffic = ImageFolderData(default_traffic_dir(), info, seed=args.seed)
        medial = ee.collect(torch.utils.data.DataLoader(traffic, batch_size=256), tmp, seed=args.seed)
    try:
        train = medial.indices("train")
        source = np.asarray(medial.source)[train]
        train_clean = np.sort(train[np.unique(source, return_index=True)[1]])  # one row per image, no copies
        remaining = {c.name: c.remaining_flops for c in ee.candidates}
        variants = [v for v in args.variants.split(",") if v]
        unknown = set(variants) - set(remaining)
        if unknown:
            raise SystemExit(f"--variants: {sorted(unknown)} are not candidates; choose from {list(remaining)}")
        print(f"ResNet-56, {len(medial.indices('test'))} test samples (seed {args.seed}); train rows "
              f"{len(train)} ({len(train_clean)} images + augmented copies)\n")
        header = f"{'layer':<10}{'head':<18}{'exit at':>8}{'agree':>7}{'auroc':>7}"
        for tol in tolerances:
            header += (f"{'cover@' + format(tol, 'g'):>11}{'rich':>6}{'flops@' + format(tol, 'g'):>11}"
                       f"{'need@' + format(TARGETS[tol], 'g') if tol in TARGETS else '':>11}")
        print(header)
        chain: list[dict] = []  # calibrated log-probs of the default heads so far, per split
        tops = {split: medial.teacher(medial.indices(split)).argmax(1) for split in ("tune", "val", "test")}
        for c in ee.candidates:
            runs = [("default", DEFAULT_HEAD, train)]
            if c.name in variants:
                runs += [("default, no aug.", DEFAULT_HEAD, train_clean), ("conv 64 k3", CONV_HEAD, train)]
            for name, spec, rows in runs:
                start = time.perf_counter()
                shape = medial.meta.shapes[medial.candidates.index(c.name)]
                head_cost = count_flops(build_head(spec, shape, medial.meta.num_classes),
                                        torch.zeros(1, *shape)) / ee.backbone_flops
                exit_cost = 1 - remaining[c.name] / ee.backbone_flops + head_cost
                row = measure(medial, c.name, spec, rows, exit_cost, head_cost, tolerances)
                rich = None
                if name == "default":  # a gate reading every exit so far, fitted on tune + val
                    chain.append(row["log_probs"])
                    features = {s: rich_features([lp[s] for lp in chain]) for s in ("tune", "val", "test")}
                    agree = {s: (chain[-1][s].argmax(1) == tops[s]).float() for s in features}
                    rich = rich_gate_scores(torch.cat([features["tune"], features["val"]]),
                                            torch.cat([agree["tune"], agree["val"]]), features["test"])
                line = f"{c.name:<10}{name:<18}{exit_cost:>8.3f}{row['agreement']:>7.3f}{row['auroc']:>7.3f}"
                for tol in tolerances:
                    rich_cover = "" if rich is None else \
                        format(hindsight_coverage(rich, agree["test"].numpy() > 0.5, tol), ".3f")
                    line += f"{row[f'cover@{tol:g}']:>11.3f}{rich_cover:>6}{row[f'flops@{tol:g}']:>11.3f}"
                    line += f"{row[f'need@{TARGETS[tol]:g}']:>11.3f}" if tol in TARGETS else f"{'':>11}"
                print(line + f"   ({time.perf_counter() - start:.0f} s)", flush=True)
        print("\nexit at: FLOPs fraction of a sample answered there; cover@tol: hindsight coverage on the test split "
              "with disagreements <= tol, most confident first; rich: the same, ranked instead by a logistic gate "
              "on all exits so far (fitted on tune + val); flops@tol: one exit there with cover@tol; need@F: "
              "coverage one exit there needs for flops_fraction F (inf: impossible)")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
