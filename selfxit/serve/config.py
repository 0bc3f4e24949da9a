"""What a server is configured with and what it hands out: ServeConfig, ServedItem, the traffic-logger hook.

Only the standard library is imported here, so that ``selfxit serve --help`` (which reads the defaults
from :class:`ServeConfig`) answers without importing torch or FastAPI.
"""
from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


@dataclass
class ServeConfig:
    """What to serve and the server's limits."""

    bundle: Path | None = None  # bundle folder; also watched for hot reload
    model: str | None = None  # backbone name for selfxit.zoo.load_backbone
    weights: Path | None = None
    plain: bool = False  # serve the plain backbone (the bundle's exits switched off), e.g. as a baseline
    host: str = "127.0.0.1"
    port: int = 8000
    max_wait_ms: float = 5.0  # how long the oldest queued request waits for others to join its batch
    max_batch: int = 64  # items per request
    max_microbatch: int = 128  # items per early-exit run (a request is never split)
    max_queue_items: int = 4096  # queued items beyond this get 503
    max_body_bytes: int = 8 << 20  # also the WebSocket message limit
    max_image_pixels: int = 4096 * 4096
    # decoded pixels per request, summed from the image headers before any is decoded; None: max_batch x 512 x 512
    max_request_pixels: int | None = None
    request_timeout_s: float = 30.0
    max_queue_wait_ms: float = 1000.0  # a request expected to wait longer than this in the queue gets 503 at once
    read_timeout_s: float = 10.0  # a request's head, then its body, must arrive within this long (else 408/close)
    drain_timeout_s: float = 10.0  # on SIGTERM: how long in-flight requests get to finish
    admin_token: str | None = None  # bearer token for state-changing routes (POST /v1/reload)
    trusted_network: bool = False  # allow a non-loopback host without an admin token
    docs: bool = True  # serve /docs, /redoc and /openapi.json
    reload_poll_s: float = 1.0  # 0 turns off watching the bundle folder
    log: str | None = None  # traffic log directory or fsspec URL (see selfxit.serve.monitor); None: no logging
    log_fraction: float = 0.1  # fraction of served items appended to the log
    shadow_fraction: float = 0.02  # fraction of served items also run through the whole backbone
    guard: bool = False  # run the live guard (selfxit.serve.live_guard) on the bundle's certified family
    guard_alpha: float = 0.05  # the guard's false-alarm probability over the whole run
    guard_max_shadow: float | None = None  # shadow fraction while alarmed; None: max(0.2, shadow_fraction)
    guard_state: str | None = None  # guard.json path; None: LOG/guard.json when the log is a local folder
    device: str = "cpu"  # where the model runs: cpu or cuda
    engine: str | None = None  # runtime: hooks or buckets; None: buckets on cuda, hooks on cpu
    compile: str = "off"  # bucketed runtime: off, heads, all, reduce-overhead, cudagraph (see selfxit.core.fused)
    buckets: tuple[int, ...] | None = None  # bucket ladder; None: powers of two up to max_microbatch

    def runtime(self):
        """The :class:`~selfxit.core.bucketed.RuntimeConfig` served with (None: the hook runtime). Imports torch;
        ValueError naming the flag for a ladder that does not cover ``max_microbatch`` or a bad setting."""
        engine = self.engine or ("buckets" if self.device == "cuda" else "hooks")
        if engine == "hooks" and self.compile == "off" and self.buckets is None:
            return None
        from selfxit.core.bucketed import RuntimeConfig
        try:
            return RuntimeConfig(engine=engine, compile=self.compile, max_batch=self.max_microbatch,
                                 buckets=self.buckets).validate()
        except ValueError as exc:
            raise ValueError(f"--engine/--compile/--buckets (with --max-microbatch {self.max_microbatch}): {exc}") \
                from None

    @property
    def guard_max_shadow_fraction(self) -> float:
        """The shadow fraction the guard may raise to while alarmed."""
        if self.guard_max_shadow is not None:
            return self.guard_max_shadow
        return max(0.2, self.shadow_fraction)

    def validate(self) -> None:
        """Refuse limits that would make every request fail, before a model is loaded for nothing."""
        for name in ("max_batch", "max_microbatch", "max_queue_items", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0 or self.reload_poll_s < 0:
            raise ValueError("max_wait_ms and reload_poll_s must be >= 0 and request_timeout_s > 0")
        if self.max_request_pixels is not None and self.max_request_pixels < 1:
            raise ValueError(f"max_request_pixels must be at least 1 (or None); got {self.max_request_pixels}")
        for name in ("max_queue_wait_ms", "read_timeout_s", "drain_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number; got {value}")
        if self.guard:
            self.validate_guard()
        if self.device not in ("cpu", "cuda") or self.engine not in (None, "hooks", "buckets"):
            raise ValueError(f"--device must be cpu or cuda and --engine hooks or buckets; got {self.device!r}, "
                             f"{self.engine!r}")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ValueError("admin_token must be at least 16 characters (a guessable token protects nothing)")
        if not is_loopback(self.host) and not self.admin_token and not self.trusted_network:
            raise ValueError(f"refusing to bind {self.host!r} without an admin token: anyone who can reach it could "
                             "reload the bundle. Set --admin-token (or SELFXIT_ADMIN_TOKEN), or pass "
                             "--trusted-network if every host on that network may administer this server")

    def validate_guard(self) -> None:
        """The live guard's flags (checked before any model is loaded)."""
        if not (math.isfinite(self.guard_alpha) and 0 < self.guard_alpha < 1):
            raise ValueError(f"--guard-alpha must be in (0, 1); got {self.guard_alpha}")
        if not 0 <= self.shadow_fraction <= 1:
            raise ValueError(f"--shadow-fraction must be in [0, 1]; got {self.shadow_fraction}")
        top = self.guard_max_shadow_fraction
        if not (math.isfinite(top) and self.shadow_fraction <= top <= 1):
            raise ValueError(f"--guard-max-shadow must be in [--shadow-fraction {self.shadow_fraction:g}, 1] (the "
                             f"guard raises the shadow fraction to it while alarmed); got {top:g}")
        if self.plain:
            raise ValueError("--guard cannot watch --plain: the plain backbone has no exits to guard")

    @property
    def request_pixels(self) -> int:
        """The per-request pixel budget: ``max_request_pixels``, or by default max_batch x 512 x 512.

        Why 512 x 512 per item: decoding costs CPU in proportion to pixels, and the model sees every image
        resized to its own input (32 x 32 or 224 x 224), so larger uploads buy nothing. 512 x 512 covers
        typical photos sent at ImageNet scale with room to spare, and with the default max_batch of 64 the
        budget equals max_image_pixels (4096 x 4096): one image at the single-image limit still fits, while
        a request costs at most about one full-size decode instead of 64 of them.
        """
        return self.max_request_pixels if self.max_request_pixels is not None else self.max_batch * 512 * 512


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, 'localhost')."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


@dataclass
class ServedItem:
    """One answered item, as handed to the traffic logger."""

    request_id: int
    endpoint: str  # "predict" or "stream"
    index: int  # position in its request
    prediction: int
    probability: float
    exit: str  # exit layer name, or "final"
    exit_position: int  # position in the cascade, or -1
    latency_ms: float
    bundle_generation: int
    input: torch.Tensor  # the normalised input the model saw, [C, H, W]


class TrafficLogger(Protocol):
    """Receives every answered item, on the event loop thread (so it must be quick).

    It may also have ``live_agreement() -> (agreement, samples) | None``; /metrics then exports
    what it says instead of the built-in monitor's figure.
    """

    def on_result(self, item: ServedItem) -> None: ...


class NullTrafficLogger:
    """The default: logs nothing."""

    def on_result(self, item: ServedItem) -> None:
        pass


class _CallableLogger:
    def __init__(self, fn: Callable[[ServedItem], None]):
        self.on_result = fn


def as_traffic_logger(traffic_logger) -> TrafficLogger:
    """Accept an object with ``on_result`` or a plain callable, so simple hooks need no class."""
    if traffic_logger is None:
        return NullTrafficLogger()
    if hasattr(traffic_logger, "on_result"):
        return traffic_logger
    if callable(traffic_logger):
        return _CallableLogger(traffic_logger)
    raise TypeError("traffic_logger must have on_result(item) or be a callable taking a ServedItem")
