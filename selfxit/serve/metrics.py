"""The server's Prometheus metrics, through ``prometheus-client``, in a registry of the app's own.

Each app gets its own :class:`~prometheus_client.CollectorRegistry`, so several apps in one process
(tests, a deployment serving two bundles) never clash over metric names. Counters and the latency
histogram are updated as requests are served (thread-safe: the worker thread counts micro-batches);
gauges that describe the present (queue length, bundle generation, live agreement, hit rates) are read
from the app at scrape time by a collector, so they can never go stale.

The ``*_created`` series the library adds to counters and histograms are left out: they were never part
of this server's metrics, and turning them off globally would change every other registry in the process.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes: the classic text format

# A gauge read at scrape time: a number, or [(labels, number), ...] for a labelled family.
GaugeValue = float | int | list[tuple[dict[str, str], float]]
GaugeSource = Callable[[], dict[str, tuple[str, GaugeValue]]]  # name -> (help, value)


class _Collector:
    """What the registry collects: the instruments (without ``_created`` samples) and the scrape-time gauges."""

    def __init__(self, instruments: Iterable, gauges: list[GaugeSource]):
        self._instruments, self._gauges = list(instruments), gauges

    def collect(self) -> Iterable[Metric]:
        for instrument in self._instruments:
            for family in instrument.collect():
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
                yield family
        for source in self._gauges:
            for name, (help_text, value) in source().items():
                if isinstance(value, list):
                    labels = sorted({key for label_set, _ in value for key in label_set})
                    family = GaugeMetricFamily(name, help_text, labels=labels)
                    for label_set, number in value:
                        family.add_metric([str(label_set.get(key, "")) for key in labels], float(number))
                else:
                    family = GaugeMetricFamily(name, help_text, value=float(value))
                yield family


class ServeMetrics:
    """Requests, errors, items per exit, item latency, micro-batches and reloads of one app."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self._requests = Counter("selfxit_requests", "Requests (HTTP) and batches (WebSocket) received.",
                                 ["endpoint"], registry=None)
        self._errors = Counter("selfxit_errors", "Requests refused or failed, by status.", ["endpoint", "status"],
                               registry=None)
        self._exits = Counter("selfxit_exit_items", "Answered items by exit taken (final = backbone).", ["exit"],
                              registry=None)
        self._latency = Histogram("selfxit_item_latency_seconds", "Time from request to each item's answer.",
                                  buckets=LATENCY_BUCKETS, registry=None)
        self._microbatches = Counter("selfxit_microbatches", "Early-exit runs.", registry=None)
        self._microbatch_requests = Counter("selfxit_microbatch_requests", "Requests served by those runs.",
                                            registry=None)
        self._microbatch_items = Counter("selfxit_microbatch_items", "Items in those runs.", registry=None)
        self._reloads = Counter("selfxit_reloads", "Bundle reload attempts by result.", ["result"], registry=None)
        for result in ("ok", "refused"):  # both series exist from the start, at 0
            self._reloads.labels(result=result)
        self._guard_moves = Counter("selfxit_guard_moves", "Live guard moves of the served scale, by kind.",
                                    ["kind"], registry=None)
        self._gauges: list[GaugeSource] = []
        self._collector = _Collector(
            [self._requests, self._errors, self._exits, self._latency, self._microbatches,
             self._microbatch_requests, self._microbatch_items, self._reloads], self._gauges)
        self.registry.register(self._collector)

    def guard_enabled(self) -> None:
        """Export the guard's move counter, both series from the start at 0 (only a server running --guard)."""
        if self._guard_moves not in self._collector._instruments:
            self._collector._instruments.append(self._guard_moves)
        for kind in ("tighten", "relax"):
            self._guard_moves.labels(kind=kind)

    def guard_move(self, kind: str) -> None:
        self._guard_moves.labels(kind=kind).inc()

    def add_gauges(self, source: GaugeSource) -> None:
        """Export what ``source()`` returns at every scrape (name -> (help, value))."""
        self._gauges.append(source)

    def request(self, endpoint: str) -> None:
        self._requests.labels(endpoint=endpoint).inc()

    def error(self, endpoint: str, status: int) -> None:
        self._errors.labels(endpoint=endpoint, status=str(status)).inc()

    def item(self, exit_name: str, seconds: float) -> None:
        self._exits.labels(exit=exit_name).inc()
        self._latency.observe(seconds)

    def microbatch(self, requests: int, items: int) -> None:
        self._microbatches.inc()
        self._microbatch_requests.inc(requests)
        self._microbatch_items.inc(items)

    def reload(self, ok: bool) -> None:
        self._reloads.labels(result="ok" if ok else "refused").inc()

    def render(self) -> bytes:
        """The exposition text of this app's registry (serve it with :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


def monitor_gauges(snapshot: dict, live: tuple[float, int] | None, queue_items: int,
                   generation: int) -> dict[str, tuple[str, GaugeValue]]:
    """The scrape-time gauges of a server: its queue and bundle, and what its traffic monitor measured.

    ``snapshot`` is :meth:`selfxit.serve.monitor.TrafficMonitor.snapshot`; ``live`` the live agreement
    (agreement, samples) to export, or None before any shadow-run item (the two gauges are then absent).
    """
    gauges: dict[str, tuple[str, GaugeValue]] = {
        "selfxit_queue_items": ("Items waiting for the worker.", queue_items),
        "selfxit_bundle_generation": ("Bundle generation being served (1 = first).", generation),
        "selfxit_exit_hit_rate": ("Fraction of served items answered at each exit.",
                                  [({"exit": n}, r) for n, r in sorted(snapshot["hit_rates"].items())]),
        "selfxit_exit_live_agreement": (
            "Shadow-sampled agreement with the backbone of items answered at each exit.",
            [({"exit": n}, e["agreement"]) for n, e in sorted(snapshot["exit_agreement"].items())]),
        "selfxit_traffic_logged_items": ("Items appended to the traffic log.", snapshot["logging"]["logged"]),
        "selfxit_traffic_log_enabled": ("1 while traffic logging works, 0 when off or failed.",
                                        int(snapshot["logging"]["enabled"])),
    }
    if live is not None:
        agreement, samples = live
        gauges["selfxit_live_agreement"] = ("Shadow-sampled agreement of served answers with the backbone.", agreement)
        gauges["selfxit_shadow_samples"] = ("Items the live agreement is measured on.", samples)
    return gauges
