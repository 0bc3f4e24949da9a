"""Part B of issue 14, measured only: how far a label-free fine-tuned copy of the backbone drifts from it.

Called by ``benchmarks/savings.py --drift``. A copy of the ResNet-56 is trained jointly with linear exit heads
(2x2-pooled maps at the given layers) by KL to the frozen original's softmax on the *train* images of the
seeded split (random flips and shifts, the recorder's own ``augment``), with the original's softmax as the
target for every head and for the copy's final output. Per setting it reports, on the held-back *test*
images, how often the copy's final answer agrees with the original's (the drift a mixed regime's final exit
starts from: it must stay above 1 - T before any exit fires), and each head's agreement with the original,
next to the same heads trained on the frozen original (the frozen regime) for the same epochs.
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
        names = [n for n, _ in model.named_modules()]
        for name, p in model.named_parameters():
            module = name.rsplit(".", 1)[0]
            p.requires_grad_(not setting.up_to_last_exit or names.index(module) <= names.index(last) or
                             module.startswith(last + "."))
            if p.requires_grad:
                trainable.append(p)
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
