"""Part B of issue 14, measured only: how far a label-free fine-tuned copy of the backbone drifts from it.

Called by ``benchmarks/savings.py --drift``. A copy of the ResNet-56 is trained jointly with linear exit heads
(2x2-pooled maps at the given layers) by KL to the frozen original's softmax on the *train* images of the
seeded split (random flips and shifts, the recorder's own ``augment``), with the original's softmax as the
target for every head and for the copy's final output. Per setting it reports, on the held-back *test*
images, how often the copy's final answer agrees with the original's (the drift a mixed regime's final exit
starts from: it must stay above 1 - T before any exit fires), and each head's agreement with the original,
next to the same heads trained on the frozen original (the frozen regime) for the same epochs.

``measure_mixed`` (``savings.py --mixed``) goes further: it starts the joint training from the frozen regime's
trained heads (so the joint phase is judged by what it adds to them), and certifies each result the way ``fit``
does, with the copy's final answers counted against the tolerance.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from selfxit.core.heads import build_head
from selfxit.fit.record import augment
from selfxit.zoo.data import split_indices

LINEAR_HEAD = {"kind": "pool_mlp", "pool": 2, "hidden": []}


@dataclass
class Setting:
    """One way of keeping the copy close to the original."""

    name: str
    lr: float = 0.001  # SGD with momentum 0.9, the copy's weights (heads: 10x)
    frozen_bn: bool = True  # BatchNorm statistics stay the original's (the copy runs in eval mode)
    l2sp: float = 0.0  # weight of sum ||w - w_original||^2 (L2-SP)
    final_weight: float = 1.0  # weight of the final output's KL against the heads' (1 each)
    up_to_last_exit: bool = False  # only blocks up to the last exit train; the later ones stay the original's


SETTINGS = [
    Setting("frozen BN, L2-SP 0.01, final KL x5", l2sp=0.01, final_weight=5.0),
    Setting("frozen BN, L2-SP 0.01, final KL x20, only blocks up to the last exit", l2sp=0.01, final_weight=20.0,
            up_to_last_exit=True),  # diverged at lr 0.001 (the 20x loss scale): the next one divides lr by 4
    Setting("frozen BN, L2-SP 0.01, final KL x20, only blocks up to the last exit, lr 0.00025", lr=0.00025,
            l2sp=0.01, final_weight=20.0, up_to_last_exit=True),
]


def _images(traffic, rows: np.ndarray) -> torch.Tensor:
    return torch.stack([traffic[int(i)][0] for i in rows])


def _capture(model: nn.Module, layers: list[str]):
    """Forward hooks keeping each layer's output of the last forward (with its graph) in a dict."""
    modules, out = dict(model.named_modules()), {}
    hooks = [modules[name].register_forward_hook(lambda m, i, o, name=name: out.__setitem__(name, o))
             for name in layers]
    return out, hooks


def _trainable(model: nn.Module, up_to: str | None) -> list[nn.Parameter]:
    """The copy's parameters that train (``requires_grad`` set accordingly): all, or with ``up_to`` only those of
    modules up to and including that layer in module order (the later blocks stay the original's)."""
    names = [n for n, _ in model.named_modules()]
    trainable = []
    for name, p in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        p.requires_grad_(up_to is None or names.index(module) <= names.index(up_to) or module.startswith(up_to + "."))
        if p.requires_grad:
            trainable.append(p)
    return trainable


def _batches(n: int, size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    return [order[i:i + size] for i in range(0, n, size)]


def _kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(logits, 1), target, reduction="batchmean")


def _heads(layers: list[str], shapes: dict[str, tuple[int, ...]], num_classes: int, seed: int) -> nn.ModuleDict:
    torch.manual_seed(seed)
    return nn.ModuleDict({name.replace(".", "_"): build_head(LINEAR_HEAD, shapes[name], num_classes) for name in layers})


def _evaluate(model, heads, layers, test_x, test_top1) -> dict:
    acts, hooks = _capture(model, layers)
    model.eval()
    finals, per_head = [], {name: [] for name in layers}
    with torch.no_grad():
        for start in range(0, len(test_x), 256):
            finals.append(model(test_x[start:start + 256]).argmax(1))
            for name in layers:
                per_head[name].append(heads[name.replace(".", "_")](acts[name]).argmax(1))
    for h in hooks:
        h.remove()
    return {"final_agreement": float((torch.cat(finals) == test_top1).float().mean()),
            "head_agreement": {n: float((torch.cat(v) == test_top1).float().mean()) for n, v in per_head.items()}}


def _train(model, heads, layers, train_x, original: nn.Module, setting: Setting | None, epochs: int,
           seed: int) -> None:
    """Joint training (``setting``) or, with None, heads alone on the frozen model (the frozen regime); every
    target is the frozen ``original``'s softmax on the same augmented batch."""
    generator = torch.Generator().manual_seed(seed)
    acts, hooks = _capture(model, layers)
    trainable = []
    if setting is not None:
        last = max(layers, key=list(dict(model.named_modules())).index)
        trainable = _trainable(model, last if setting.up_to_last_exit else None)
        start_weights = [p.detach().clone() for p in trainable]
        model.train(not setting.frozen_bn)
        groups = [{"params": trainable, "lr": setting.lr}, {"params": heads.parameters(), "lr": 10 * setting.lr}]
    else:
        model.eval().requires_grad_(False)
        groups = [{"params": heads.parameters(), "lr": 0.01}]
    optimizer = torch.optim.SGD(groups, momentum=0.9)
    for _ in range(epochs):
        for batch in _batches(len(train_x), 128, generator):
            x = augment(train_x[batch], generator)
            with torch.no_grad():
                target = original(x).softmax(1)
            if setting is None:
                with torch.no_grad():
                    model(x)
                final_loss = torch.zeros(())
            else:
                final_loss = setting.final_weight * _kl(model(x), target)
            loss = final_loss + sum(_kl(heads[n.replace(".", "_")](acts[n]), target) for n in layers)
            if setting is not None and setting.l2sp:
                loss = loss + setting.l2sp * sum(((p - p0) ** 2).sum() for p, p0 in zip(trainable, start_weights))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for h in hooks:
        h.remove()


def measure_drift(model: nn.Module, traffic, seed: int, layers: list[str], epochs: int = 2,
                  max_train: int = 4000, settings=SETTINGS, frozen: bool = True) -> dict:
    """Drift of the copy's final answer and head agreements per setting, on the test split (see the docstring)."""
    split = split_indices(len(traffic), seed)
    train_rows = np.random.default_rng(seed).permutation(split["train"])[:max_train]
    train_x, test_x = _images(traffic, train_rows), _images(traffic, split["test"])
    model = model.eval()
    with torch.no_grad():
        test_top1 = torch.cat([model(test_x[i:i + 256]).argmax(1) for i in range(0, len(test_x), 256)])
        acts, hooks = _capture(model, layers)
        model(test_x[:1])
        shapes = {n: tuple(acts[n].shape[1:]) for n in layers}
        for h in hooks:
            h.remove()
    num_classes = int(model(test_x[:1]).shape[1])
    results: dict = {"train_images": len(train_x), "epochs": epochs, "layers": layers, "settings": {}}
    for setting in ([None] if frozen else []) + list(settings):
        start = time.perf_counter()
        student = copy.deepcopy(model)
        heads = _heads(layers, shapes, num_classes, seed)
        _train(student, heads, layers, train_x, model, setting, epochs, seed)
        row = _evaluate(student, heads, layers, test_x, test_top1)
        row["seconds"] = time.perf_counter() - start
        name = "frozen regime (heads only)" if setting is None else setting.name
        results["settings"][name] = {**row, **({"setting": asdict(setting)} if setting else {})}
        print(f"  drift: {name:<70} final agreement {row['final_agreement']:.4f}  heads "
              f"{ {k: round(v, 3) for k, v in row['head_agreement'].items()} }  ({row['seconds']:.0f} s)", flush=True)
    return results


# --- The mixed regime end to end: warm-started heads, the copy's final exit counted, certified ----------------------

@dataclass
class Joint:
    """One way of fine-tuning the copy jointly with its heads, starting from the frozen regime's trained heads."""

    name: str
    lr: float = 1e-4  # SGD with momentum 0.9 on the copy's weights (BatchNorm statistics stay the original's)
    epochs: int = 2
    l2sp: float = 0.01  # weight of sum ||w - w_original||^2 (L2-SP)
    final_weight: float = 5.0  # weight of the copy's final KL; each head's KL has weight ``head_weight``
    head_weight: float = 1.0
    head_lr: float = 1e-4  # AdamW on the heads (they start trained)
    up_to_last_exit: bool = False  # only blocks up to the frozen design's last exit train
    more_rows: bool = False  # each batch also gets a mixup, a cutmix and a jittered copy (the original labels them)


JOINTS = [
    Joint("lr 1e-4, L2-SP 0.01, final KL x5"),
    Joint("lr 1e-3, L2-SP 0.01, final KL x5", lr=1e-3),
    Joint("lr 1e-4, L2-SP 0.01, final KL x20, heads x0.25", final_weight=20.0, head_weight=0.25),
    Joint("lr 1e-4, L2-SP 0.01, final KL x5, only blocks up to the last exit", up_to_last_exit=True),
    Joint("lr 1e-4, L2-SP 0.01, final KL x5, + mixup/cutmix/jitter rows", more_rows=True),
    Joint("lr 3e-5, L2-SP 0.01, final KL x20, heads x0.25", lr=3e-5, final_weight=20.0, head_weight=0.25),
]


def _scores(model: nn.Module, heads: list[nn.Module], layers: list[str], x: torch.Tensor) -> tuple[list, torch.Tensor]:
    """Each head's logits and the model's final top-1 on ``x`` (no augmentation, eval mode)."""
    acts, hooks = _capture(model, layers)
    model.eval()
    logits: list[list] = [[] for _ in layers]
    finals = []
    with torch.no_grad():
        for start in range(0, len(x), 256):
            finals.append(model(x[start:start + 256]).argmax(1))
            for k, name in enumerate(layers):
                logits[k].append(heads[k](acts[name]))
    for h in hooks:
        h.remove()
    return [torch.cat(v) for v in logits], torch.cat(finals)


def _stats(logits: list, temperatures: list[float], top1: torch.Tensor, head_flops: np.ndarray,
           remaining: np.ndarray, total: float):
    """ExitStats of the heads: calibrated max-softmax and agreement with the original's top-1."""
    from selfxit.fit.select import ExitStats

    conf = [(lg / t).softmax(1).max(1).values.double().numpy() for lg, t in zip(logits, temperatures)]
    agree = [(lg.argmax(1) == top1).numpy() for lg in logits]
    return ExitStats(np.stack(conf), np.stack(agree), head_flops, remaining, total)


def _with_final(heads, final_agree: np.ndarray):
    """``heads`` plus a last exit that always fires (confidence 1, threshold 0), costs nothing beyond the backbone
    and carries the copy's final disagreements: what a mixed regime answers where no head fires."""
    from selfxit.fit.select import ExitStats

    n = heads.confidence.shape[1]
    return ExitStats(np.vstack([heads.confidence, np.ones(n)]), np.vstack([heads.agree, final_agree]),
                     np.append(heads.head_flops, 0.0), np.append(heads.remaining_flops, 0.0), heads.total_flops)


def _certified(splits: dict, tolerance: float, delta: float, max_exits: int) -> dict:
    """The product's certified design (shape on *tune*, Learn-then-Test on *val*) with the final exit counted:
    the shape is designed on the heads at the tolerance less the copy's final disagreement rate on *tune*, and
    every tested cascade carries the always-firing final exit, so the binomial test on *val* covers the whole
    cascade, the copy's final answers included. Measured on *test*."""
    from selfxit.fit.select import OFF, SCALES, certify, design_shape, evaluate_cascade, scaled_thresholds

    heads_tune, ext = splits["tune"][0], {s: v[1] for s, v in splits.items()}
    final_drop = 1.0 - float(ext["tune"].agree[-1].mean())
    budget = tolerance - final_drop
    shape = (design_shape(heads_tune, budget, max_exits) if budget > 0 else np.full(heads_tune.num_exits, OFF))
    path = [evaluate_cascade(ext["tune"], np.append(scaled_thresholds(shape, s), 0.0)) for s in SCALES]
    cert = certify(path, ext["val"], tolerance, delta, scales=SCALES)
    test = evaluate_cascade(ext["test"], cert.chosen.thresholds)
    return {"flops_fraction": test.flops_fraction, "agreement": 1.0 - test.drop, "scale": cert.scale,
            "thresholds": [float(t) for t in cert.chosen.thresholds[:-1]],
            "exits": [int(k) for k in np.flatnonzero(np.isfinite(cert.chosen.thresholds[:-1]))]}


def _train_joint(student: nn.Module, heads: list[nn.Module], layers: list[str], train_x: torch.Tensor,
                 original: nn.Module, joint: Joint, last_exit: str, seed: int) -> None:
    from selfxit.fit.augment import AugmentConfig, augmented_copies

    generator = torch.Generator().manual_seed(seed)
    acts, hooks = _capture(student, layers)
    trainable = _trainable(student, last_exit if joint.up_to_last_exit else None)
    start_weights = [p.detach().clone() for p in trainable]
    student.eval()  # frozen BatchNorm statistics
    backbone_opt = torch.optim.SGD(trainable, lr=joint.lr, momentum=0.9)
    head_params = [p for h in heads for p in h.parameters()]
    for p in head_params:
        p.requires_grad_(True)
    head_opt = torch.optim.AdamW(head_params, lr=joint.head_lr, weight_decay=5e-4)
    extra = AugmentConfig(copies=1, mixup=1, cutmix=1, jitter=0.4)
    for _ in range(joint.epochs):
        for batch in _batches(len(train_x), 128, generator):
            x = augment(train_x[batch], generator)
            if joint.more_rows:
                x = torch.cat([x] + [c for c, _ in augmented_copies(train_x[batch], generator, extra)])
            with torch.no_grad():
                target = original(x).softmax(1)
            loss = joint.final_weight * _kl(student(x), target)
            loss = loss + joint.head_weight * sum(_kl(h(acts[n]), target) for h, n in zip(heads, layers))
            if joint.l2sp:
                loss = loss + joint.l2sp * sum(((p - p0) ** 2).sum() for p, p0 in zip(trainable, start_weights))
            backbone_opt.zero_grad()
            head_opt.zero_grad()
            loss.backward()
            backbone_opt.step()
            head_opt.step()
    for h in hooks:
        h.remove()


def measure_mixed(ee, traffic, seed: int, tolerances=(0.01, 0.05), joints=JOINTS, max_train: int | None = None,
                  delta: float = 0.1, max_exits: int = 4) -> dict:
    """The mixed regime against the frozen one with the same heads, certified the same way (see :func:`_certified`).

    ``ee`` holds the frozen regime's trained heads (a fit on its medial dataset of ``traffic`` with ``seed``). Each
    joint setting copies the backbone and those heads, fine-tunes both on the *train* images, recalibrates the
    heads on *tune* and certifies on *val*; the frozen row is the same heads on the untouched backbone. Reported on
    *test*: the copy's final agreement with the original, and per tolerance the certified FLOPs and agreement.
    """
    from selfxit.fit.calibrate import fit_temperature
    from selfxit.fit.medial import SPLITS
    from selfxit.fit.record import assign_splits

    records = list(ee.records.values())
    if not records:
        raise ValueError("measure_mixed needs the frozen regime's heads: fit ee first")
    layers = [r.layer for r in records]
    remaining = {c.name: c.remaining_flops for c in ee.candidates}
    head_flops = np.array([r.head_flops for r in records], dtype=np.float64)
    rest = np.array([remaining[n] for n in layers], dtype=np.float64)
    total = float(ee.backbone_flops)
    codes = assign_splits(len(traffic), seed)
    rows = {s: np.flatnonzero(codes == SPLITS[s]) for s in ("train", "tune", "val", "test")}
    if max_train:
        rows["train"] = rows["train"][:max_train]
    x = {s: _images(traffic, r) for s, r in rows.items()}
    original = ee.backbone.eval()
    with torch.no_grad():
        top1 = {s: torch.cat([original(v[i:i + 256]).argmax(1) for i in range(0, len(v), 256)])
                for s, v in x.items() if s != "train"}

    def evaluate_model(model: nn.Module, heads: list[nn.Module], mixed: bool) -> dict:
        scored = {s: _scores(model, heads, layers, x[s]) for s in ("tune", "val", "test")}
        temps = [fit_temperature(lg, top1["tune"]) for lg in scored["tune"][0]]
        splits = {}
        for s, (logits, final) in scored.items():
            heads_only = _stats(logits, temps, top1[s], head_flops, rest, total)
            final_agree = (final == top1[s]).numpy() if mixed else np.ones(len(final), dtype=bool)
            splits[s] = (heads_only, _with_final(heads_only, final_agree))
        row = {"final_agreement": {s: float(v[1].agree[-1].mean()) for s, v in splits.items()},
               "head_agreement": {n: float(splits["test"][0].agree[k].mean()) for k, n in enumerate(layers)}}
        for tol in tolerances:
            row[f"{tol:g}"] = _certified(splits, tol, delta, max_exits)
        return row

    frozen_heads = [copy.deepcopy(r.head).eval() for r in records]
    results: dict = {"train_images": len(x["train"]), "layers": layers, "settings": {}}
    start = time.perf_counter()
    results["settings"]["frozen regime (the fit's heads)"] = row = evaluate_model(original, frozen_heads, False)
    row["seconds"] = time.perf_counter() - start
    _print_mixed("frozen regime (the fit's heads)", row, tolerances)
    first = row[f"{tolerances[0]:g}"]["exits"]
    last_exit = layers[max(first)] if first else layers[-1]
    for joint in joints:
        start = time.perf_counter()
        student, heads = copy.deepcopy(original), [copy.deepcopy(h) for h in frozen_heads]
        _train_joint(student, heads, layers, x["train"], original, joint, last_exit, seed)
        row = evaluate_model(student, heads, True)
        row["seconds"] = time.perf_counter() - start
        row["setting"] = asdict(joint)
        results["settings"][joint.name] = row
        _print_mixed(joint.name, row, tolerances)
    return results


def _print_mixed(name: str, row: dict, tolerances) -> None:
    figures = "  ".join(f"T={t:g}: flops {row[f'{t:g}']['flops_fraction']:.3f} agreement "
                        f"{row[f'{t:g}']['agreement']:.4f}" for t in tolerances)
    print(f"  mixed: {name:<70} final agreement (test) {row['final_agreement']['test']:.4f}  {figures}  "
          f"({row['seconds']:.0f} s)", flush=True)
