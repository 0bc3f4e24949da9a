"""Running the app under uvicorn: a graceful drain on SIGTERM, and a deadline for request heads.

Shutdown (SIGTERM or Ctrl+C), in order:

1. the listening socket is closed at once: new connections are refused, never accepted and then dropped;
2. the app drains: a request arriving on a connection that is already open gets 503 with ``Retry-After``
   and ``Connection: close`` (:class:`selfxit.serve.guard.RequestGuard`), a WebSocket message an error and
   close code 1001, while every request already in flight is answered; this ends when none is in flight,
   or after ``drain_timeout_s``;
3. uvicorn's own shutdown closes the now idle connections, and the lifespan's end stops the worker and
   flushes and closes the traffic log.

A second signal skips the rest of the drain. Why not uvicorn's shutdown alone: it closes idle keep-alive
connections at once, so a request a client was sending on one is lost with no answer, and it gives no way
to tell a client when to retry.

Request heads: uvicorn has no deadline for a connection that sends part of a request head and then
nothing (a slow-loris client holds a connection forever), so :class:`HeadTimeoutH11` closes a connection
whose request head has not arrived within ``read_timeout_s`` (bodies get the same budget, see
:func:`selfxit.serve.requests.read_body`).
"""
from __future__ import annotations

import asyncio
import logging
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from selfxit.serve.guard import Lifecycle

log = logging.getLogger("selfxit.serve.app")


class HeadTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head is not complete within ``head_timeout_s``."""

    head_timeout_s = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm()

    def _waiting_for_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._waiting_for_head() and not self.transport.is_closing():
            self.transport.close()  # nothing unread is left in the kernel: a clean FIN, not a reset

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing() or self.transport.get_protocol() is not self:  # closed, or now a WebSocket
            self._disarm()
        elif self._waiting_for_head():
            self._arm()  # a partial head: the timer that started with the connection (or last response) runs on
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # idle now: uvicorn's keep-alive timeout applies; a new partial head re-arms ours

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain described in the module docstring."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, drain_timeout_s: float):
        super().__init__(config)
        self.lifecycle, self.drain_timeout_s = lifecycle, drain_timeout_s
        self._drain_asked: float | None = None
        self._drain_started: float | None = None

    def handle_exit(self, sig, frame) -> None:
        if self._drain_asked is not None or self.should_exit:  # a second signal: stop draining now
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)  # re-raised by uvicorn after shutdown, as for its own handling
        self._drain_asked = time.monotonic()  # acted on by on_tick, on the event loop, not in the signal handler

    async def on_tick(self, counter: int) -> bool:
        if self._drain_asked is not None and self._drain_started is None:
            self._drain_started = time.monotonic()
            self.lifecycle.draining = True
            for server in getattr(self, "servers", []):
                server.close()  # stop accepting: new connections are refused
            log.warning("draining: %d requests in flight, up to %g s", self.lifecycle.in_flight,
                        self.drain_timeout_s)
        if self._drain_started is not None and not self.should_exit:
            waited = time.monotonic() - self._drain_started
            if self.lifecycle.in_flight <= 0 or waited >= self.drain_timeout_s:
                if self.lifecycle.in_flight > 0:
                    log.error("drain timeout (%g s): %d requests still in flight are cut off",
                              self.drain_timeout_s, self.lifecycle.in_flight)
                else:
                    log.warning("drained in %.2f s", waited)
                self.should_exit = True
        return await super().on_tick(counter)


class _ClientFaultsAreWarnings(logging.Filter):
    """uvicorn logs a client's invalid UTF-8 WebSocket text with a traceback at ERROR (it then closes the
    socket with 1007, correctly): that is the client's fault, so it becomes a one-line warning, and the
    tracebacks left in the log are the server's own bugs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Invalid UTF-8 sequence received from client"):
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def run(app, config, log_level: str = "warning") -> None:
    """Serve ``app`` (from :func:`selfxit.serve.app.create_app`) on ``config.host:config.port`` until signalled."""
    logging.getLogger("uvicorn.error").addFilter(_ClientFaultsAreWarnings())
    protocol = type("HeadTimeoutH11", (HeadTimeoutH11,), {"head_timeout_s": config.read_timeout_s})
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level, http=protocol,
                               ws_max_size=config.max_body_bytes, timeout_graceful_shutdown=config.drain_timeout_s)
    DrainingServer(uv_config, app.state.lifecycle, config.drain_timeout_s).run()
