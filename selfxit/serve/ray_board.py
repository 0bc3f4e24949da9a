"""The board actor Ray Serve replicas report to (see :mod:`selfxit.serve.ray_state`).

Kept in its own module because defining a Ray actor class needs ``ray`` at import; :mod:`.ray_state` imports it
only when a board is asked for.
"""
from __future__ import annotations

import time

import ray


@ray.remote
class ReplicaBoard:
    """Every replica's last report, by replica id (plain dicts: bundle, reload, status, monitor counts, metrics)."""

    def __init__(self) -> None:
        self.entries: dict[str, dict] = {}

    def report(self, replica: str, state: dict) -> None:
        self.entries[replica] = {**state, "replica": replica, "reported_at": time.time()}

    def drop(self, replica: str) -> None:
        self.entries.pop(replica, None)

    def entries_now(self) -> dict[str, dict]:
        return dict(self.entries)
