"""Ctrl-C and SIGTERM during training: finish the current step, save, exit 130 or 143.

The first SIGINT or SIGTERM only sets a flag that the training loop reads
after each step (and after saving, and, in a single process, after each batch of
an epoch-end evaluation, which it then drops for the resumed run to do again);
the loop then writes a checkpoint, prints how to resume and the command exits
with 128 + the signal number. A second SIGINT gets the handler that was there before, so pressing
Ctrl-C twice interrupts at once (the checkpoint of the previous save is intact,
since every save is atomic). Repeated SIGTERMs change nothing: ``timeout``
signals the command and then its process group, and schedulers and torchrun
may each forward one, so a second SIGTERM arriving right after the first is
routine and must not cost the save.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

#: Exit code for a run stopped by each signal: 128 + the signal number, as shells report it.
EXIT_CODES = {"SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}


class StopRequest:
    """Set by the first SIGINT/SIGTERM: stop after the current step, save, exit 130/143."""

    def __init__(self) -> None:
        self.received: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""


@contextlib.contextmanager
def catch_stop_signals() -> Iterator[StopRequest]:
    """Turns the first SIGINT/SIGTERM into a StopRequest; a second SIGINT acts as it did before."""
    stop, previous = StopRequest(), {}

    def handle(signum, frame) -> None:
        if stop.received is None:
            stop.received = signum
        if signum == signal.SIGINT:
            signal.signal(signum, previous.get(signum, signal.SIG_DFL))

    with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handle)
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
