"""Learned exit gates (after JEI-DNN, Regol et al., ICLR 2024), trained without labels.

A gate sits on one exit of a cascade. It reads cheap features of that exit's calibrated output
(max probability, entropy, entropy at a second temperature, top-1 minus top-2 probability margin,
log-odds of the max probability) and, optionally, of the previous exit in the cascade (its probability
of our top-1, and how far that is below its own max: 0 when the two exits agree), and outputs the
probability of exiting there. A sample leaves at the first exit whose gate output reaches that exit's threshold,
exactly like a max-softmax threshold, so the optimizer and the finite-sample certification of
:mod:`selfxit.fit.select` are reused unchanged with gate outputs in place of confidences.

Targets (label-free): a sample's target exit is, among the exits whose top-1 agrees with the backbone
(and the backbone itself), the one minimising ``cross_entropy + lam * cost`` (cross-entropy of the
exit's calibrated output against the backbone's top-1; cost as a fraction of the backbone's FLOPs).
For large ``lam`` this is the cheapest agreeing exit; smaller ``lam`` asks for a more confident,
later one. Gates before the target learn 0, the target and later agreeing exits learn 1 (later exits
that disagree learn 0: firing there would be an error).

Gates whose features read the previous exit depend on which exits are active, so :func:`fit_gates`
alternates gate training with the design of the cascade on the design split until the set of active
exits stops changing; only then is the cascade certified on held-back samples (by the caller).

Optionally (``GateConfig.head_rounds``) heads are retrained with each sample weighted by the gates'
exit distribution (JEI's bi-level scheme), so that heads specialise on the samples they will see.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from selfxit.core.gates import GATES, Gate, build_gate  # noqa: F401 (the gate modules live in core)
from selfxit.core.heads import split_stem
from selfxit.fit import select as optimize
from selfxit.fit.calibrate import fit_temperature
from selfxit.fit.distill import StoredRows, head_logits, seeded, stem_features, teacher_rows
from selfxit.fit.medial import MedialDataset


@dataclass
class GateConfig:
    """Settings of the learned gates.

    ``lam``: cost weight of the target rule (larger: earlier targets; inf, the default: the cheapest
    agreeing exit); ``hidden``: width of the gate's hidden layer (0: logistic regression);
    ``second_temperature``: temperature of the second entropy feature; ``previous``: also read the
    previous exit's output; ``head_rounds``: rounds of JEI-style head retraining weighted by the gates'
    exit distribution (0: off). The defaults did best on ResNet-56 / CIFAR-10 (benchmarks/gates.py),
    though every setting tried was within noise of the others there.
    """

    lam: float = math.inf
    hidden: int = 0
    second_temperature: float = 2.0
    previous: bool = False
    weight_decay: float = 1e-3
    max_iter: int = 300
    head_rounds: int = 0
    head_epochs: int = 10
    seed: int = 0

    def __post_init__(self):
        problems = []
        if not self.lam > 0:
            problems.append(f"lam must be > 0 (inf: the cheapest agreeing exit); got {self.lam}")
        if not isinstance(self.hidden, int) or self.hidden < 0:
            problems.append(f"hidden must be an int >= 0; got {self.hidden!r}")
        if not self.second_temperature > 0:
            problems.append(f"second_temperature must be > 0; got {self.second_temperature}")
        if self.weight_decay < 0 or self.max_iter < 1 or self.head_rounds < 0 or self.head_epochs < 1:
            problems.append("weight_decay must be >= 0, max_iter >= 1, head_rounds >= 0, head_epochs >= 1; "
                            f"got {self.weight_decay}, {self.max_iter}, {self.head_rounds}, {self.head_epochs}")
        if problems:
            raise ValueError("invalid GateConfig: " + "; ".join(problems))


# ---- targets -----------------------------------------------------------------------------------------

def exit_costs(head_flops, remaining_flops, total_flops: float) -> np.ndarray:
    """Cost (fraction of backbone FLOPs) of leaving at each exit of a chain in which every exit runs,
    and, as the last entry, of the backbone's own answer."""
    heads = np.cumsum(np.asarray(head_flops, dtype=np.float64))
    at_exit = total_flops - np.asarray(remaining_flops, dtype=np.float64) + heads
    return np.append(at_exit, total_flops + (heads[-1] if len(heads) else 0.0)) / total_flops


def gate_targets(log_probs: torch.Tensor, backbone_top1: torch.Tensor, costs: np.ndarray, lam: float) -> torch.Tensor:
    """[K, N] 0/1 targets for the gates of a chain of K exits.

    ``log_probs`` [K, N, C]: calibrated log-probabilities of each exit; ``costs`` [K + 1] from
    :func:`exit_costs`. Each sample's target is the agreeing exit (or the backbone, index K) minimising
    ``cross_entropy + lam * cost``; gates learn 1 from the target on where their exit agrees.
    """
    k, n, _ = log_probs.shape
    if len(costs) != k + 1:
        raise ValueError(f"costs needs one entry per exit plus the backbone ({k + 1}); got {len(costs)}")
    agree = log_probs.argmax(dim=2) == backbone_top1[None]
    ce = -log_probs.gather(2, backbone_top1[None, :, None].expand(k, n, 1)).squeeze(2)
    cost = torch.as_tensor(costs, dtype=ce.dtype)
    if math.isinf(lam):  # the cheapest agreeing exit
        objective = torch.cat([torch.where(agree, cost[:k, None].expand(k, n), torch.inf), cost[k:, None].expand(1, n)])
    else:
        objective = torch.cat([torch.where(agree, ce + lam * cost[:k, None], torch.inf),
                               torch.full((1, n), lam * float(cost[k]), dtype=ce.dtype)])
    target = objective.argmin(dim=0)  # ties: the earlier exit
    position = torch.arange(k)[:, None]
    return ((position >= target[None]) & agree).to(torch.float32)


# ---- training ------------------------------------------------------------------------------------------

def train_gate(gate: Gate, logits: torch.Tensor, previous: torch.Tensor | None, targets: torch.Tensor,
               config: GateConfig) -> Gate:
    """Fit one gate by (L2-regularised) binary cross-entropy with L-BFGS on standardised features; the
    standardisation is then folded into the first linear layer."""
    with torch.no_grad():
        raw = gate.features(logits, previous)
        mean = raw.mean(0)
        scale = raw.std(0).clamp_min(1e-3) if len(raw) > 1 else torch.ones_like(mean)
        z = (raw - mean) / scale
    targets = targets.float()
    if targets.min() == targets.max():  # nothing to separate: a constant gate
        with torch.no_grad():
            for p in gate.net.parameters():
                p.zero_()
            cast(nn.Linear, gate.net[-1]).bias.fill_(10.0 if float(targets[0]) > 0.5 else -10.0)
        return gate.eval()
    weights = [p for name, p in gate.net.named_parameters() if name.endswith("weight")]
    optimizer = torch.optim.LBFGS(gate.net.parameters(), lr=1.0, max_iter=config.max_iter,
                                  line_search_fn="strong_wolfe")
    gate.train()

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(gate.net(z).squeeze(1), targets)
        loss = loss + config.weight_decay * sum((w ** 2).sum() for w in weights)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():  # net((f - mean) / scale) == net'(f)
        first = cast(nn.Linear, gate.net[0])
        first.weight.div_(scale)
        first.bias.sub_(first.weight @ mean)
    return gate.eval()


def chain_scores(gates: list[Gate], log_probs: torch.Tensor) -> np.ndarray:
    """[K, N] gate outputs along a chain where every exit runs (gate k reads exit k - 1's output)."""
    scores = []
    with torch.no_grad():
        for k, gate in enumerate(gates):
            previous = log_probs[k - 1].exp() if gate.previous and k > 0 else None
            scores.append(gate(log_probs[k], previous).double().numpy())
    return np.stack(scores) if scores else np.zeros((0, log_probs.shape[1]))


def train_chain(log_probs: torch.Tensor, backbone_top1: torch.Tensor, costs: np.ndarray,
                config: GateConfig) -> list[Gate]:
    """One gate per exit of a chain, trained on the given samples."""
    targets = gate_targets(log_probs, backbone_top1, costs, config.lam)
    gates = []
    for k in range(log_probs.shape[0]):
        with seeded(config.seed + k):  # the gate's initialisation, without touching the global generator
            gate = Gate(log_probs.shape[2], config.hidden, config.second_temperature, config.previous and k > 0)
        previous = log_probs[k - 1].exp() if gate.previous else None
        gates.append(train_gate(gate, log_probs[k], previous, targets[k], config))
    return gates


@dataclass
class GateFit:
    """The chain of exits the gates were fitted for (indices into the exits given) and its gates."""

    chain: list[int]
    gates: list[Gate]
    rounds: int
    history: list[list[int]] = field(default_factory=list)  # chain tried in each round

    def stats(self, log_probs: torch.Tensor, backbone_top1: torch.Tensor, head_flops, remaining_flops,
              total_flops: float) -> optimize.ExitStats:
        """ExitStats of the chain on a set of samples, with gate outputs as the confidence.

        ``log_probs`` [K_all, N, C] holds every exit given to :func:`fit_gates`; the chain is taken from it.
        An exit's cost is its head's FLOPs plus its gate's.
        """
        chain_lp = log_probs[self.chain]
        agree = (chain_lp.argmax(dim=2) == backbone_top1[None]).numpy()
        cost = np.asarray(head_flops, dtype=np.float64)[self.chain] + np.array([g.flops() for g in self.gates])
        return optimize.ExitStats(chain_scores(self.gates, chain_lp), agree, cost.reshape(len(self.chain)),
                                  np.asarray(remaining_flops, dtype=np.float64)[self.chain], total_flops)


def fit_gates(log_probs: torch.Tensor, backbone_top1: torch.Tensor, head_flops, remaining_flops, total_flops: float,
              tolerance: float, max_exits: int | None = 3, config: GateConfig | None = None,
              design_factor: float | tuple[float, ...] = optimize.DESIGN_FACTORS) -> GateFit:
    """Train gates on the design samples and find the chain of exits they are used on.

    ``log_probs`` [K, N, C]: calibrated log-probabilities of every kept exit on the design samples.
    Starting from all K exits, gates are trained for the chain, the cascade is designed on the same
    samples (as :func:`selfxit.fit.select.certified_cascade` does), and the chain shrinks to the exits
    the design keeps, until it stops changing. Certification is left to the caller, on other samples.
    """
    config = config or GateConfig()
    head_flops = np.asarray(head_flops, dtype=np.float64)
    remaining_flops = np.asarray(remaining_flops, dtype=np.float64)
    chain, history = list(range(log_probs.shape[0])), []
    for round_ in range(1, log_probs.shape[0] + 2):
        history.append(list(chain))
        costs = exit_costs(head_flops[chain], remaining_flops[chain], total_flops)
        gates = train_chain(log_probs[chain], backbone_top1, costs, config)
        fit = GateFit(list(chain), gates, round_, history)
        if not chain:
            return fit
        shape = optimize.design_shape(fit.stats(log_probs, backbone_top1, head_flops, remaining_flops, total_flops),
                             tolerance, max_exits, design_factor)
        active = [chain[k] for k in np.flatnonzero(np.isfinite(shape))]
        if active == chain:
            return fit
        chain = active  # an empty chain: no cascade saves anything within the tolerance
    return fit


# ---- JEI-style head specialisation ------------------------------------------------------------------------

def exit_distribution(scores: np.ndarray) -> np.ndarray:
    """[K + 1, N] probability of leaving at each exit (last row: the backbone) when gate k fires w.p. scores[k]."""
    survive = np.cumprod(np.vstack([np.ones((1, scores.shape[1])), 1.0 - scores]), axis=0)
    return np.vstack([survive[:-1] * scores, survive[-1:]])


def specialise_head(head: nn.Sequential, features: torch.Tensor | StoredRows, teacher: torch.Tensor | StoredRows,
                    weights: torch.Tensor,
                    epochs: int = 10, batch_size: int = 256, lr: float = 2e-3, seed: int = 0) -> nn.Sequential:
    """Fine-tune a head's trainable part by KL to the backbone, each sample weighted (mean weight 1).

    ``features`` are the outputs of the head's parameter-free stem for the training rows.
    """
    _, body = split_stem(head)
    weights = weights / weights.mean().clamp_min(1e-12)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(body.parameters(), lr=lr, weight_decay=5e-4)
    body.train()
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(features), generator=generator)
            for start in range(0, len(features), batch_size):
                batch = order[start:start + batch_size]
                log_student = F.log_softmax(body(features[batch]), dim=1)
                kl = (teacher[batch] * (torch.log(teacher[batch].clamp_min(1e-12)) - log_student)).sum(1)
                loss = (weights[batch] * kl).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    head.eval()
    return head


def specialise_heads(heads: list[nn.Sequential], layers: list[str], medial: MedialDataset, rows: np.ndarray,
                     scores: np.ndarray, config: GateConfig, progress: bool = True) -> None:
    """One round of JEI's bi-level step: fine-tune each chain head on ``rows`` (train), each sample weighted
    by ``1/2 + 1/2 * pi / mean(pi)``, ``pi`` the gates' probability that it leaves at that head.

    ``scores`` [chain, rows]: the gate outputs on those rows. Heads are changed in place.
    """
    distribution = exit_distribution(scores)
    teacher = teacher_rows(medial, rows)
    for j, (head, layer) in enumerate(tqdm(list(zip(heads, layers)), desc="specialise heads", leave=False,
                                           disable=not progress)):
        stem, _ = split_stem(head)
        pi = torch.as_tensor(distribution[j], dtype=torch.float32)
        weights = 0.5 + 0.5 * pi / pi.mean().clamp_min(1e-12)
        specialise_head(head, stem_features(stem, medial, layer, rows), teacher, weights,
                        epochs=config.head_epochs, seed=config.seed)


def fit_with_heads(log_probs: dict[str, torch.Tensor], top1: dict[str, torch.Tensor], layers: list[str],
                   heads: dict[str, nn.Sequential], temperatures: dict[str, float], medial: MedialDataset,
                   rows: dict[str, np.ndarray], head_flops, remaining_flops, total_flops: float, tolerance: float,
                   max_exits: int | None, config: GateConfig, progress: bool = True,
                   design_factor: float | tuple[float, ...] = optimize.DESIGN_FACTORS) -> GateFit:
    """:func:`fit_gates` on the 'tune' split, alternated ``config.head_rounds`` times with :func:`specialise_heads`
    on the 'train' split; specialised heads get a new temperature (on 'tune') and their rows of
    ``log_probs[split]`` [K, N, C] are refreshed. ``heads``, ``temperatures`` and ``log_probs`` change in place.
    """
    fit = fit_gates(log_probs["tune"], top1["tune"], head_flops, remaining_flops, total_flops, tolerance,
                    max_exits, config, design_factor)
    for _ in range(config.head_rounds):
        if not fit.chain:
            break
        names = [layers[k] for k in fit.chain]
        train_lp = torch.stack([(head_logits(heads[n], medial, n, rows["train"]) / temperatures[n]).log_softmax(1)
                                for n in names])
        specialise_heads([heads[n] for n in names], names, medial, rows["train"], chain_scores(fit.gates, train_lp),
                         config, progress)
        for k, name in zip(fit.chain, names):
            logits = {s: head_logits(heads[name], medial, name, rows[s]) for s in log_probs}
            temperatures[name] = fit_temperature(logits["tune"], top1["tune"])
            for s in log_probs:
                log_probs[s][k] = (logits[s] / temperatures[name]).log_softmax(1)
        fit = fit_gates(log_probs["tune"], top1["tune"], head_flops, remaining_flops, total_flops, tolerance,
                        max_exits, config, design_factor)
    return fit


def config_dict(config: GateConfig) -> dict:
    """The config as a JSON-friendly dict (``lam`` = inf is written as the string 'inf')."""
    out = asdict(config)
    out["lam"] = "inf" if math.isinf(config.lam) else config.lam
    return out
