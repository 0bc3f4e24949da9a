"""A live guard: an anytime-valid test of the agreement drop on shadow samples, and the thresholds it serves.

**The test.** Each shadow sample gives ``X = 1`` when the answer served disagrees with the backbone
(0 otherwise; items answered by the backbone count 0). The promise is ``E[X] <= T`` (the tolerance). The
guard bets against it (Waudby-Smith and Ramdas, "Estimating means of bounded random variables by
betting", JRSS-B 2024: the one-sided betting test): the wealth
``K_t = prod_i (1 + lambda_i (X_i - T))`` with ``lambda_i >= 0`` chosen from samples *before* i is a
nonnegative supermartingale whenever ``E[X_i | past] <= T``, so by Ville's inequality
``P(K_t >= 1/alpha for some t) <= alpha``: reading the test after every sample, for as long as the server
runs, raises a false alarm on traffic that keeps the promise with probability at most ``alpha``. X is
binary, so the bet is the plug-in Kelly bet for a Bernoulli mean, ``(mu - T) / (T (1 - T))`` clipped at 0
(aGRAPA's ``(mu - T) / (var + (mu - T)^2)`` bets less for binary X and alarmed later in
``benchmarks/live_guard.py``), with ``mu`` exponentially weighted over recent shadow samples (any
predictable bet keeps the guarantee; the recency lets the bet follow drift).
While the estimate stays below T the guard bets nothing, so a long clean stream costs no wealth.

**The moves.** A bundle certifies a family ``threshold = 1 - s (1 - shape)`` (see
:class:`selfxit.core.exits.CertifiedFamily`); smaller ``s`` is stricter, ``s = 0`` is the backbone alone.
On an alarm the guard steps ``s`` down to the loosest point whose disagreement on recent shadow samples
(exponentially weighted, the same half-life as the bet) is at most half the tolerance, or to 0 when none
is, and starts a fresh test there (each served scale is its own hypothesis). One step of the family at a
time was measured to be too slow: a drop of 7.5% needs many points, and each alarm costs hundreds of
shadow samples. It relaxes one step only when a mirror test on the *next looser* scale
(``prod (1 + lambda (T - X))``, evidence that its drop is below T) reaches ``1/alpha``; shadow samples
run every exit (no shrinking), so the drop any scale would have had is known from the same samples.
While alarmed it asks for a higher shadow fraction (up to ``max_shadow``) so evidence comes faster.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from selfxit.core.exits import CertifiedFamily

NEVER = 2.0  # a threshold no score in [0, 1] reaches: what the guard serves at s = 0


@dataclass
class GuardConfig:
    """``alpha``: false-alarm probability over any run; ``base_shadow``/``max_shadow``: shadow fraction when
    calm / alarmed; ``half_life``: shadow samples over which the bet's estimates forget (recent window)."""

    alpha: float = 0.05
    base_shadow: float = 0.02
    max_shadow: float = 0.2
    half_life: float = 200.0

    def __post_init__(self):
        if not 0 < self.alpha < 1:
            raise ValueError(f"--guard-alpha must be in (0, 1); got {self.alpha}")
        if not 0 <= self.base_shadow <= 1:
            raise ValueError(f"the shadow fraction must be in [0, 1]; got {self.base_shadow}")
        if not self.base_shadow <= self.max_shadow <= 1:
            raise ValueError(f"--guard-max-shadow must be in [the shadow fraction {self.base_shadow}, 1]; "
                             f"got {self.max_shadow}")
        if self.half_life < 10:
            raise ValueError(f"the guard's half-life must be at least 10 shadow samples; got {self.half_life}")


class BettingTest:
    """One-sided anytime-valid test of ``E[X] <= bound`` (``upper=True``) or ``E[X] >= bound`` for X in [0, 1].

    ``update(x)`` returns True once the wealth has reached ``1/alpha`` (the hypothesis is rejected). The bet
    reads an exponentially weighted mean of the samples so far (half-life ``half_life`` samples), started
    at the bound, so it bets nothing until the evidence leans against the hypothesis.
    """

    def __init__(self, bound: float, alpha: float, upper: bool = True, half_life: float = 200.0):
        if not 0 < bound < 1:
            raise ValueError(f"bound must be in (0, 1); got {bound}")
        self.bound, self.alpha, self.upper = float(bound), float(alpha), upper
        self._rate = 1.0 - 0.5 ** (1.0 / half_life)
        self._mean = self.bound
        self.log_wealth = 0.0
        self.samples = 0
        # a bet never risks all the wealth: 1 + lambda * gain >= 1/2 for every x in [0, 1]
        self.max_bet = 0.5 / (self.bound if upper else 1.0 - self.bound)

    def _bet(self) -> float:
        edge = (self._mean - self.bound) if self.upper else (self.bound - self._mean)
        if edge <= 0:
            return 0.0
        return min(edge / (self.bound * (1.0 - self.bound)), self.max_bet)  # plug-in Kelly for binary X

    def update(self, x: float) -> bool:
        x = float(x)
        gain = (x - self.bound) if self.upper else (self.bound - x)
        self.log_wealth += math.log1p(self._bet() * gain)
        self.samples += 1
        self._mean += self._rate * (x - self._mean)  # moved only after the bet on x: the bet stays predictable
        return self.rejected

    @property
    def rejected(self) -> bool:
        return self.log_wealth >= math.log(1.0 / self.alpha)

    @property
    def wealth(self) -> float:
        return math.exp(min(self.log_wealth, 700.0))


@dataclass
class GuardMove:
    """One change of the served scale, for the log, /metrics and /v1/monitor."""

    at: float
    kind: str  # 'tighten' or 'relax'
    from_scale: float
    to_scale: float
    shadow_samples: int  # shadow samples the deciding test had seen
    wealth: float


@dataclass
class LiveGuard:
    """Watches shadow samples and moves the served scale along the bundle's certified family."""

    family: CertifiedFamily
    config: GuardConfig = field(default_factory=GuardConfig)

    def __post_init__(self):
        if self.family.scale is None:
            raise ValueError("the bundle certified no scale (no exit passed the test), so there is nothing to "
                             "guard: serve it without --guard")
        self.layers = list(self.family.shape)  # forward order of the family's exits
        self._scales = np.array(sorted(self.family.scales))
        shape = np.array([self.family.shape[layer] for layer in self.layers])
        self._grid = 1.0 - self._scales[:, None] * (1.0 - shape[None, :])  # [scales, exits] thresholds
        self._grid[self._scales <= 0] = NEVER  # s = 0 is the backbone alone, even for a score of exactly 1.0
        self._recent = np.zeros(len(self._scales))  # recent disagreement of every scale (EWMA)
        self._recent_rate = 1.0 - 0.5 ** (1.0 / self.config.half_life)
        self.scale = float(self.family.scale)
        self.moves: list[GuardMove] = []
        self.shadow_samples = 0
        self._lock = threading.Lock()
        self._restart()

    def _restart(self) -> None:
        c = self.config
        self.alarm_test = BettingTest(self.family.tolerance, c.alpha, upper=True, half_life=c.half_life)
        looser = self.family.looser(self.scale)
        self.relax_to: float | None = looser if looser > self.scale else None
        self.relax_test = (BettingTest(self.family.tolerance, c.alpha, upper=False, half_life=c.half_life)
                           if self.relax_to is not None else None)

    @property
    def alarmed(self) -> bool:
        """Serving below the certified scale: the promise was found broken and is not yet restored."""
        return self.family.scale is not None and self.scale < float(self.family.scale) - 1e-12

    @property
    def shadow_fraction(self) -> float:
        return self.config.max_shadow if self.alarmed else self.config.base_shadow

    def thresholds(self, scale: float | None = None) -> dict[str, float]:
        """The thresholds to serve at ``scale`` (default: now): the family's, except at ``s = 0``.

        There the family's thresholds are 1.0, which a max-softmax that rounds to exactly 1.0 in float32
        still reaches; the guard serves :data:`NEVER` (above any score, and finite for JSON) instead, so
        ``s = 0`` is the backbone alone, as the issue's last step asks.
        """
        scale = self.scale if scale is None else scale
        if scale <= 0:
            return dict.fromkeys(self.layers, NEVER)
        return self.family.thresholds(scale)

    def disagrees(self, scale: float, backbone: int, predictions: list[int], scores: list[float]) -> int:
        """1 when the cascade at ``scale`` would have answered a shadow sample differently from the backbone.

        ``predictions``/``scores``: every family exit's top-1 and score (max-softmax, or gate output) in
        forward order, from a run without shrinking.
        """
        thresholds = self.thresholds(scale)
        for layer, prediction, score in zip(self.layers, predictions, scores):
            if score >= thresholds[layer]:
                return int(prediction != backbone)
        return 0

    def observe(self, backbone: int, predictions: list[int], scores: list[float]) -> GuardMove | None:
        """Feed one shadow sample; returns the move it triggered, if any (serve :meth:`thresholds` then)."""
        with self._lock:
            self.shadow_samples += 1
            self._track(backbone, predictions, scores)
            if self.alarm_test.update(self.disagrees(self.scale, backbone, predictions, scores)):
                return self._move("tighten", self._safer_scale(), self.alarm_test)
            if self.relax_test is not None and self.relax_to is not None:
                if self.relax_test.update(self.disagrees(self.relax_to, backbone, predictions, scores)):
                    return self._move("relax", self.relax_to, self.relax_test)
            return None

    def _track(self, backbone: int, predictions: list[int], scores: list[float]) -> None:
        """Update every scale's recent disagreement from one shadow sample (what each would have answered)."""
        fires = np.asarray(scores, dtype=np.float64)[None, :] >= self._grid
        first = fires.argmax(axis=1)
        wrong = np.asarray(predictions)[first] != backbone
        x = (fires.any(axis=1) & wrong).astype(np.float64)
        self._recent += self._recent_rate * (x - self._recent)

    def _safer_scale(self) -> float:
        """Where to go on an alarm: the loosest stricter scale whose recent drop is at most half the tolerance."""
        safe = (self._scales < self.scale - 1e-12) & (self._recent <= 0.5 * self.family.tolerance)
        return float(self._scales[safe].max()) if safe.any() else 0.0

    def _move(self, kind: str, to: float, test: BettingTest) -> GuardMove | None:
        if to == self.scale:  # already serving the backbone alone: nothing stricter
            self._restart()
            return None
        move = GuardMove(time.time(), kind, self.scale, to, test.samples, test.wealth)
        self.scale = to
        self.moves.append(move)
        self._restart()
        return move

    def snapshot(self) -> dict:
        """What /v1/monitor and /healthz show."""
        with self._lock:
            return {"alarmed": self.alarmed, "scale": self.scale, "certified_scale": self.family.scale,
                    "shadow_fraction": self.shadow_fraction, "shadow_samples": self.shadow_samples,
                    "alarm_wealth": self.alarm_test.wealth, "alpha": self.config.alpha,
                    "moves": len(self.moves), "tightened": sum(m.kind == "tighten" for m in self.moves),
                    "relaxed": sum(m.kind == "relax" for m in self.moves),
                    "last_move": vars(self.moves[-1]) if self.moves else None}
