"""Stopping a run on request, with a checkpoint, on every operating system.

    with StopRequest() as stop:        # the training loop's whole life
        ... if stop.reason: checkpoint, then stop.saved() ...

What asks: Ctrl-C (SIGINT) and SIGTERM everywhere; on Windows also Ctrl-Break (SIGBREAK) and the
closing of the console window, logging off or shutting down. The loop sees `reason` after its
current step, writes a checkpoint and stops; a second Ctrl-C stops at once (KeyboardInterrupt).

Closing the window is Windows' odd one out: it is no signal Python can wait on. The system calls the
console's handlers on a thread of its own and ends the process as soon as they return (or after 5
seconds: SPI_GETWAITTOKILLTIMEOUT, the CTRL_CLOSE_EVENT documentation). Python's C runtime handler
returns at once, so a run would die mid-step with everything since its last scheduled checkpoint
lost. Our handler (SetConsoleCtrlHandler, through ctypes) asks for the stop, then waits up to
CLOSE_WAIT seconds for the loop to say the checkpoint is written. A checkpoint that takes longer is
cut off, and the one before stays intact (checkpoints are written beside their place and renamed in).
"""

from __future__ import annotations

import signal
import sys
import threading

# Windows' console events (wincon.h) that end the process once the handlers return.
CTRL_CLOSE_EVENT, CTRL_LOGOFF_EVENT, CTRL_SHUTDOWN_EVENT = 2, 5, 6
_ENDING_EVENTS = {CTRL_CLOSE_EVENT: "closing the console window", CTRL_LOGOFF_EVENT: "logging off",
                  CTRL_SHUTDOWN_EVENT: "shutting down"}
# Windows waits 5 s for a console handler after a close before it ends the process; a little less,
# so that the handler returns by itself.
CLOSE_WAIT = 4.5


def stop_signals() -> list[signal.Signals]:
    """The signals that ask a run to stop here: SIGINT, SIGTERM, and SIGBREAK where it exists (Windows)."""
    names = ("SIGINT", "SIGTERM", "SIGBREAK")
    return [getattr(signal, name) for name in names if hasattr(signal, name)]


class StopRequest:
    """Whether (and why) the user asked the run to stop; installs the handlers while in a `with` block,
    on the main thread only (Python allows signal handlers nowhere else)."""

    def __init__(self):
        self.reason: str | None = None
        self._saved = threading.Event()
        self._previous: dict = {}
        self._console = None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in stop_signals()}
            self._console = set_console_handler(self.on_console_event)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._console is not None:
            self._console()
        self._saved.set()  # a handler still waiting has nothing more to wait for

    def _on_signal(self, signum, frame) -> None:
        if self.reason is not None:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.reason = signal.Signals(signum).name

    def on_console_event(self, event: int) -> bool:
        """Windows' console handler: for a closing window (or log-off, shutdown), ask for the stop and
        wait for the checkpoint; True says the event is handled. Other events (Ctrl-C, Ctrl-Break)
        go on to Python's own handler, which raises the signals above."""
        if event not in _ENDING_EVENTS:
            return False
        if self.reason is None:
            self.reason = _ENDING_EVENTS[event]
        self._saved.wait(CLOSE_WAIT)
        return True

    def saved(self) -> None:
        """The loop has written its checkpoint: a waiting console handler may let the process end."""
        self._saved.set()


def set_console_handler(handler):
    """Register `handler(event) -> bool` as a Windows console control handler; returns the function
    that removes it, or None elsewhere (or where the console API is missing)."""
    if sys.platform != "win32":
        return None
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    routine_type = ctypes.WINFUNCTYPE(wintypes.BOOL, wintypes.DWORD)
    routine = routine_type(lambda event: bool(handler(int(event))))
    if not kernel32.SetConsoleCtrlHandler(routine, True):
        return None  # no console (a service, pythonw): nothing to close

    def remove() -> None:
        kernel32.SetConsoleCtrlHandler(routine, False)  # `routine` stays alive until here

    return remove
