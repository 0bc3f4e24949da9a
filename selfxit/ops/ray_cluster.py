"""Joining a Ray cluster in bounded time, for the Ray paths of serve, collect and retrain (``--ray``).

Why a reachability check first: ``ray.init(address=...)`` to an address nobody answers retries for a long
time before it fails; a TCP connect to the cluster's port answers in bounded time with a clear message.
"""
from __future__ import annotations

import socket

from selfxit.extras import require_extra


class ClusterUnreachableError(ConnectionError, RuntimeError):
    """The Ray cluster address does not answer (a RuntimeError too, so the command line reports it in one line)."""


def check_reachable(address: str | None, timeout_s: float) -> None:
    """Fail within ``timeout_s`` when a cluster address's host:port does not answer ('auto' and None are local)."""
    if address in (None, "", "auto", "local"):
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--address {address!r}: expected HOST:PORT (e.g. 10.0.0.5:6379), ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterUnreachableError(f"Ray cluster at {address} cannot be reached within {timeout_s:g} s ({exc}); start one "
                              "with `ray start --head` or check the address") from None


def connect(address: str | None = None, num_cpus: int | None = None, timeout_s: float = 15.0,
            feature: str = "--ray") -> bool:
    """Join the cluster at ``address`` (None: start a local one, loopback only, without the dashboard).
    Returns True when this call started Ray (so the caller shuts it down)."""
    require_extra("ray", feature)
    import ray
    if ray.is_initialized():
        return False
    check_reachable(address, timeout_s)
    if address in (None, "", "local"):
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 namespace="selfxit")
    else:
        ray.init(address=address, log_to_driver=False, namespace="selfxit")
    return True


def shutdown_at_exit() -> None:
    """Stop the Ray this process started when it exits (a command line run that called :func:`connect`)."""
    import atexit

    import ray
    atexit.register(ray.shutdown)
