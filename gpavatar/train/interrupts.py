"""Ctrl-C and SIGTERM during training: finish the step, save, stop.

:class:`StopSignals` turns the first SIGINT / SIGTERM into a request (``requested``) that the
training loop checks between steps, so a checkpoint is never written from a half-updated model;
a second signal raises :class:`KeyboardInterrupt` at once (the loop then saves only if the
model was not in the middle of its update). Outside the main thread (where Python cannot
install handlers) it does nothing.

    >>> import os, signal
    >>> with StopSignals() as stop:
    ...     os.kill(os.getpid(), signal.SIGINT)
    ...     stop.requested, stop.signal_name, stop.exit_code
    (True, 'SIGINT', 130)
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Callable, Optional

__all__ = ["StopSignals"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager: the first SIGINT / SIGTERM sets ``requested``; the second raises KeyboardInterrupt.

    Args:
        enabled: False makes it a no-op (signals keep their handlers)
        announce: called with a one-line message on the first signal (default: print to stderr)
    Attributes: ``requested`` (bool), ``signal_name`` ("SIGINT" | "SIGTERM" | None),
        ``exit_code`` (128 + the signal number, the shell's convention: 130 / 143).
    """

    def __init__(self, enabled: bool = True, announce: Optional[Callable[[str], None]] = None):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.announce = announce if announce is not None else (lambda text: print(text, file=sys.stderr, flush=True))
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> Optional[str]:
        return None if self.signum is None else signal.Signals(self.signum).name

    @property
    def exit_code(self) -> Optional[int]:
        return None if self.signum is None else 128 + self.signum

    def request(self, signum: int = signal.SIGINT) -> None:
        """Ask for a stop as the signal ``signum`` would (also usable without signals)."""
        if self.signum is None:
            self.signum = int(signum)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self._restore()
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} received twice")
        self.signum = signum
        self.announce(f"{signal.Signals(signum).name} received: stopping after this step and saving "
                      f"(send it again to quit at once)")

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if self.enabled:
            for signum in SIGNALS:
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()
