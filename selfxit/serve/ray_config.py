"""The settings of a Ray Serve deployment of selfxit (joining the cluster: :mod:`selfxit.ops.ray_cluster`).

Only the standard library is imported here, so the command line can validate its flags before Ray is imported.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

DEFAULT_APP = "selfxit"


@dataclass
class RayServeConfig:
    """How the early-exit model runs on Ray Serve (the request limits and monitoring are a ``ServeConfig``).

    ``replicas`` is a fixed count; ``min_replicas``/``max_replicas`` (both, or neither) turn on Ray Serve's
    autoscaling, aiming at ``target_ongoing_requests`` per replica. ``max_batch_size`` requests (not items)
    are micro-batched by ``@serve.batch`` for up to ``batch_wait_timeout_s``. ``version`` pins one version of a
    bundle store; None follows ``current`` (polled every ``poll_s``).
    """

    app_name: str = DEFAULT_APP
    replicas: int = 2
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.005
    max_ongoing_requests: int | None = None  # default: max(16, 2 x max_batch_size)
    max_queued_requests: int = 256  # beyond this Ray Serve answers 503 at once
    replica_cpus: float = 1.0
    threads: int = 1  # torch threads per replica
    poll_s: float = 1.0
    version: str | None = None
    extra: dict = field(default_factory=dict)  # more Ray Serve deployment options, passed as they are

    def validate(self) -> None:
        """Refuse settings Ray Serve would refuse later, naming the flag."""
        for name in ("replicas", "max_batch_size", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("--min-replicas and --max-replicas go together (autoscaling); give both or neither")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 0 <= --min-replicas <= --max-replicas; got {self.min_replicas}, {self.max_replicas}")
        if self.target_ongoing_requests is not None and self.min_replicas is None:
            raise ValueError("--target-ongoing-requests needs --min-replicas/--max-replicas (autoscaling)")
        if self.ongoing < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.ongoing}) must be >= --max-batch-size "
                             f"({self.max_batch_size}), or a batch can never fill")
        for name in ("batch_wait_timeout_s", "poll_s", "replica_cpus"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a number >= 0; got {value}")

    @property
    def ongoing(self) -> int:
        return self.max_ongoing_requests if self.max_ongoing_requests is not None else max(16, 2 * self.max_batch_size)

    def deployment_options(self) -> dict:
        """The ``Deployment.options`` these settings make."""
        options = {"max_ongoing_requests": self.ongoing, "max_queued_requests": self.max_queued_requests,
                   "ray_actor_options": {"num_cpus": self.replica_cpus}, "user_config": self.user_config(),
                   **self.extra}
        if self.min_replicas is not None:
            scaling = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                       "initial_replicas": max(self.min_replicas, min(self.replicas, self.max_replicas))}
            if self.target_ongoing_requests is not None:
                scaling["target_ongoing_requests"] = self.target_ongoing_requests
            options["autoscaling_config"] = scaling
        else:
            options["num_replicas"] = self.replicas
        return options

    def user_config(self) -> dict:
        """What replicas get through ``reconfigure`` (changed in place, without restarting them)."""
        return {"version": self.version, "poll_s": self.poll_s, "max_batch_size": self.max_batch_size,
                "batch_wait_timeout_s": self.batch_wait_timeout_s}

    def to_dict(self) -> dict:
        return asdict(self)
