"""``selfxit serve``: run the HTTP/WebSocket server on a bundle (see :mod:`selfxit.serve.app`).

``add_parser`` only declares arguments (defaults come from :class:`selfxit.serve.config.ServeConfig`,
which imports nothing heavy), so ``selfxit --help`` stays fast; ``run`` imports torch, FastAPI and
uvicorn when the server is actually started.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from selfxit.cli.common import add_model_args, load_backbone, quiet_libraries
from selfxit.extras import require_extra
from selfxit.serve.config import ServeConfig, is_loopback

log = logging.getLogger("selfxit.serve.app")  # the server logs under one name, as before the split


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``serve`` on an argparse subparsers object; ``func`` is :func:`run`."""
    d = ServeConfig()
    p = sub.add_parser("serve", help="serve a bundle over HTTP and WebSocket (micro-batching, hot reload)")
    p.add_argument("--bundle", required=True, help="bundle folder (watched for changes); with --ray also a bundle "
                                                   "store (followed through its current version) or an fsspec URL")
    add_model_args(p)
    p.add_argument("--plain", action="store_true", help="serve the plain backbone (exits off), e.g. as a baseline")
    p.add_argument("--host", default=d.host, help="interface to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, help="micro-batching window")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="items per request")
    p.add_argument("--max-microbatch", type=int, default=d.max_microbatch, help="items per early-exit run")
    p.add_argument("--max-queue-items", type=int, default=d.max_queue_items)
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="pixels per image")
    p.add_argument("--max-request-pixels", type=int, default=d.max_request_pixels,
                   help="decoded pixels per request, summed from the image headers before decoding "
                        "(default: max-batch x 512 x 512)")
    p.add_argument("--max-queue-wait-ms", type=float, default=d.max_queue_wait_ms,
                   help="refuse (503 + Retry-After) a request expected to wait longer than this in the queue")
    p.add_argument("--timeout-s", type=float, default=d.request_timeout_s, help="request timeout")
    p.add_argument("--read-timeout-s", type=float, default=d.read_timeout_s,
                   help="a request's head, then its body, must arrive within this (else the connection closes / 408)")
    p.add_argument("--drain-timeout-s", type=float, default=d.drain_timeout_s,
                   help="on SIGTERM, how long in-flight requests get to finish")
    p.add_argument("--admin-token", default=os.environ.get("SELFXIT_ADMIN_TOKEN"),
                   help="bearer token POST /v1/reload requires (default: $SELFXIT_ADMIN_TOKEN; prefer the "
                        "variable, a command line is visible to other users)")
    p.add_argument("--trusted-network", action="store_true",
                   help="allow a non-loopback --host without an admin token (everyone there may reload)")
    p.add_argument("--no-docs", dest="docs", action="store_false", help="turn off /docs, /redoc and /openapi.json")
    p.add_argument("--reload-poll-s", type=float, default=d.reload_poll_s, help="bundle polling period; 0: off")
    p.add_argument("--log", help="traffic log folder or fsspec URL to append sampled traffic to (default: none)")
    p.add_argument("--log-fraction", type=float, default=d.log_fraction, help="fraction of items logged")
    p.add_argument("--shadow-fraction", type=float, default=d.shadow_fraction,
                   help="fraction of items also run through the whole backbone to measure live agreement")
    p.add_argument("--guard", action="store_true",
                   help="live guard: test the tolerance promise on shadow samples (anytime-valid) and move the "
                        "thresholds along the bundle's certified family when it breaks (needs method 'certified')")
    p.add_argument("--guard-alpha", type=float, default=d.guard_alpha,
                   help="the guard's false-alarm probability over the whole run (default 0.05)")
    p.add_argument("--guard-max-shadow", type=float, default=d.guard_max_shadow,
                   help="shadow fraction while alarmed (default: max(0.2, --shadow-fraction))")
    p.add_argument("--guard-state", help="where the guard's state is written for `selfxit retrain --if-alarmed` "
                                         "(default: LOG/guard.json when --log is a local folder)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=d.device, help="where the model runs")
    p.add_argument("--engine", choices=["hooks", "buckets"], default=d.engine,
                   help="runtime: hooks (exact on CPU) or buckets (micro-batches padded to a ladder of batch sizes, "
                        "every bucket warmed before ready; default on --device cuda)")
    p.add_argument("--compile", choices=["off", "heads", "all", "reduce-overhead", "cudagraph"], default=d.compile,
                   help="bucketed runtime: torch.compile scope, or CUDA graphs per bucket")
    p.add_argument("--buckets", type=_ladder, default=d.buckets,
                   help="bucket ladder, e.g. 1,8,32,128 (default: powers of two up to --max-microbatch)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's; with --ray: 1 per replica)")
    add_ray_args(p)
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)
    return p


def add_ray_args(p) -> None:
    """The ``--ray`` flags (defaults from :class:`selfxit.serve.ray_config.RayServeConfig`, standard library only)."""
    from selfxit.serve.ray_config import RayServeConfig
    d = RayServeConfig()
    g = p.add_argument_group("Ray Serve (--ray; needs pip install 'selfxit[ray]')")
    g.add_argument("--ray", action="store_true", help="serve with Ray Serve: replicas behind one endpoint, rolling "
                                                      "bundle updates, monitoring across replicas")
    g.add_argument("--address", help="Ray cluster to join (HOST:PORT, ray://HOST:PORT or auto); default: start a "
                                     "local one on 127.0.0.1")
    g.add_argument("--replicas", type=int, default=d.replicas, help="replicas (fixed count)")
    g.add_argument("--min-replicas", type=int, help="autoscaling: fewest replicas (with --max-replicas)")
    g.add_argument("--max-replicas", type=int, help="autoscaling: most replicas")
    g.add_argument("--target-ongoing-requests", type=float, help="autoscaling: requests per replica to aim at")
    g.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="requests per @serve.batch run")
    g.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                   help="requests queued beyond this get 503 from Ray Serve")
    g.add_argument("--replica-cpus", type=float, default=d.replica_cpus, help="CPUs Ray reserves per replica")
    g.add_argument("--ray-cpus", type=int, help="CPUs of the local Ray started without --address (default: all)")
    g.add_argument("--version", dest="pin_version", help="serve this version of the bundle store instead of "
                                                         "following current")


def ray_config_from_args(args):
    """A RayServeConfig from the parsed ``serve --ray`` arguments."""
    from selfxit.serve.ray_config import RayServeConfig
    return RayServeConfig(replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                          target_ongoing_requests=args.target_ongoing_requests, max_batch_size=args.max_batch_size,
                          batch_wait_timeout_s=args.max_wait_ms / 1000, max_queued_requests=args.max_queued_requests,
                          replica_cpus=args.replica_cpus, threads=args.threads or 1,
                          poll_s=args.reload_poll_s, version=args.pin_version)


def run_ray(args, config: ServeConfig) -> None:
    """``selfxit serve --ray``: deploy on Ray Serve and wait; on Ctrl+C or SIGTERM remove the app (and the local Ray
    this command started)."""
    import signal
    import threading

    from selfxit.ops.ray_cluster import connect
    ray_config = ray_config_from_args(args)
    try:
        ray_config.validate()
    except ValueError as exc:
        raise SystemExit(f"selfxit serve --ray: {exc}") from None
    started = connect(args.address, args.ray_cpus)
    import ray
    from ray import serve

    from selfxit.serve.ray_serve import ray_app
    from selfxit.serve.ray_state import kill_board
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(ray_app(args.bundle, args.model, args.weights, config, ray_config), name=ray_config.app_name,
                  route_prefix="/")
        print(f"selfxit serve --ray: {ray_config.replicas if ray_config.min_replicas is None else 'autoscaled'} "
              f"replicas of {args.bundle} at http://{config.host}:{config.port}/ (Ctrl+C stops)", flush=True)
        stop.wait()
    finally:
        try:
            serve.delete(ray_config.app_name)
        finally:
            kill_board(ray_config.app_name)
            if started:
                serve.shutdown()
                ray.shutdown()


def _ladder(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--buckets takes comma-separated batch sizes, e.g. 1,8,32; got {text!r}") \
            from None


def config_from_args(args) -> ServeConfig:
    """A ServeConfig from the parsed ``serve`` arguments."""
    return ServeConfig(bundle=Path(args.bundle), model=args.model, weights=args.weights, plain=args.plain,
                       host=args.host, port=args.port, max_wait_ms=args.max_wait_ms, max_batch=args.max_batch,
                       max_microbatch=args.max_microbatch, max_queue_items=args.max_queue_items,
                       max_body_bytes=args.max_body_bytes, max_image_pixels=args.max_image_pixels,
                       max_request_pixels=args.max_request_pixels, max_queue_wait_ms=args.max_queue_wait_ms,
                       request_timeout_s=args.timeout_s, read_timeout_s=args.read_timeout_s,
                       drain_timeout_s=args.drain_timeout_s, admin_token=args.admin_token or None,
                       trusted_network=args.trusted_network, docs=args.docs,
                       reload_poll_s=args.reload_poll_s, log=args.log, log_fraction=args.log_fraction,
                       shadow_fraction=args.shadow_fraction, guard=args.guard, guard_alpha=args.guard_alpha,
                       guard_max_shadow=args.guard_max_shadow, guard_state=args.guard_state,
                       device=getattr(args, "device", "cpu"), engine=getattr(args, "engine", None),
                       compile=getattr(args, "compile", "off"), buckets=getattr(args, "buckets", None))


def run(args) -> None:
    """Run the server until interrupted (a bad bundle or model fails here, before binding the port)."""
    quiet_libraries()
    require_extra("serve", "selfxit serve")
    import torch

    from selfxit.serve.app import create_app
    from selfxit.serve.reload import BundleLoader
    from selfxit.serve.server import run as serve_app

    config = config_from_args(args)
    try:
        config.validate()  # before a model is loaded for nothing
        runtime = config.runtime()  # a ladder that does not cover --max-microbatch is refused here
    except ValueError as exc:
        raise SystemExit(f"selfxit serve: {exc}") from None
    if config.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("selfxit serve: --device cuda, but no CUDA device is available here")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.ray:
        run_ray(args, config)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if not is_loopback(config.host):
        log.warning("binding %s: the server is reachable beyond this machine (POST /v1/reload %s)", config.host,
                    "needs the admin token" if config.admin_token else "is open: --trusted-network")
    backbone, info = load_backbone(args)
    from selfxit.serve.guarding import GuardRefused
    try:
        app = create_app(BundleLoader.from_backbone(args.bundle, backbone, info, plain=args.plain, runtime=runtime,
                                                    device=config.device), config)
    except GuardRefused as exc:
        raise SystemExit(f"selfxit serve: --guard refused for {args.bundle}: {exc}") from None
    serve_app(app, config, log_level=args.log_level)
