"""Stop cleanly on SIGTERM and SIGINT: handlers that raise, so ``finally`` blocks run and remove working data.

Python's default SIGTERM ends the process at once, without running ``finally`` blocks, so a nightly job
stopped by systemd or cron's timeout would leave its working folder behind. Inside
:func:`raise_on_signals` the first SIGTERM or SIGINT raises :class:`Interrupted` (a ``SystemExit`` with
the shell's status 128 + signal number) in the main thread; further signals are ignored while the
cleanup runs. SIGKILL cannot be caught: what a killed run leaves is removed by the next run.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(SystemExit):
    """Raised by the handlers of :func:`raise_on_signals`; ``signum`` is the signal received."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}"


@contextlib.contextmanager
def raise_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block, the first of ``signals`` raises :class:`Interrupted`; the previous handlers come
    back afterwards. Outside the main thread (where Python cannot install handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum, frame):
        if fired:
            return  # already stopping: let the finally blocks finish (SIGKILL still ends the process)
        fired.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
