"""Prefect for one command: the API it talks to, and a quiet terminal.

With no PREFECT_API_URL, Prefect starts a temporary server of its own inside the command: in the
command's process group (a terminal's Ctrl-C kills it mid-run, and Prefect then retries against a
dead API for minutes), orphaned when the command is SIGTERMed, printing its start-up logs, and
failing with a traceback past a 20 s start-up timeout that a busy machine reaches. So we start the
same server (Prefect's own app, the way Prefect starts it) ourselves: in a session of its own, its
output in a log file, waited for under a stated timeout with a one-line error, and always stopped.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from modelferry.tasks.errors import OrchestrationError, SettingsError
from modelferry.tasks.clients.processes import free_port, start, stop, wait_http

STARTUP_TIMEOUT_S = 120.0  # measured 11-19 s on a loaded 2-core box; Prefect's own default is 20

OFFLINE = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}  # no telemetry lookups

# Loggers of Prefect's run engine: on a terminal they repeat the error the command prints once
# (`Finished in state Failed(...)`, `Encountered exception during execution`) and say
# `Finished in state Completed()` for every step.
RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs", "prefect.task_engine", "prefect.flow_engine")


class _Terminal(logging.Filter):
    """What a user at a terminal sees of Prefect: its warnings, minus the run engine's lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect"):
            return True
        return record.levelno >= logging.WARNING and not record.name.startswith(RUN_LOGGERS)


def quiet_terminal() -> None:
    """Filter Prefect's lines out of every terminal handler (not out of the logs Prefect sends to
    its API: the UI keeps them). Call after Prefect is imported (it configures logging then)."""
    from prefect.logging.handlers import APILogHandler

    keep_quiet = _Terminal()
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if not isinstance(handler, APILogHandler) and not any(isinstance(f, _Terminal) for f in handler.filters):
                handler.addFilter(keep_quiet)


def offline_defaults() -> None:
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)


def startup_timeout() -> float:
    raw = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
    try:
        return float(raw) if raw else STARTUP_TIMEOUT_S
    except ValueError:
        raise SettingsError(f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS={raw!r} is not a number of seconds") from None


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")


@contextlib.contextmanager
def prefect_api(verbose: bool = False):
    """The Prefect API this command uses: PREFECT_API_URL when set, else a temporary server of our
    own, started once per process (commands run in one process, as the demo does, share it) and
    stopped when the process exits. Yields a phrase saying which, for the start-up report. Prefect
    is imported here, its terminal lines filtered unless `verbose`."""
    offline_defaults()
    if _temporary.get("url") is None and os.environ.get("PREFECT_API_URL"):
        _import_prefect(verbose)
        yield f"Prefect API at {os.environ['PREFECT_API_URL']}"
        return
    if _temporary.get("url") is None:
        _start_temporary()
    _import_prefect(verbose)
    try:
        yield "a temporary Prefect server (set PREFECT_API_URL to reuse a running one)"
    finally:
        _drain()


_temporary: dict = {}


def _start_temporary() -> None:
    timeout = startup_timeout()
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "modelferry-temporary-server.log"
    port = free_port()
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    proc = start([sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
                  "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"], log_path, env,
                 dies_with_this_thread=True)  # the command's main thread: a SIGKILLed command orphans nothing
    url = f"http://127.0.0.1:{port}/api"
    began = time.perf_counter()
    try:
        wait_http(f"{url}/health", timeout, proc, ok=(200,))
    except (TimeoutError, RuntimeError):
        stop(proc, grace=1)
        raise OrchestrationError(
            f"Prefect's temporary server did not answer within {timeout:.0f} s (log: {log_path}): run "
            "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api, or raise "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") from None
    except BaseException:  # Ctrl-C while it starts
        stop(proc, grace=1)
        raise
    logging.getLogger("modelferry").debug("temporary Prefect server ready in %.1f s", time.perf_counter() - began)
    # Prefect reads its settings once per process: this URL stays for the process's lifetime.
    os.environ["PREFECT_API_URL"] = url
    _temporary.update(url=url, proc=proc)
    atexit.register(_stop_temporary)  # after Prefect's own exit handlers, which send their last logs


def _stop_temporary() -> None:
    _drain()
    stop(_temporary["proc"], grace=5)


def _import_prefect(verbose: bool) -> None:
    import prefect  # noqa: F401 - configures Prefect's logging, which quiet_terminal then filters

    if not verbose:
        quiet_terminal()


def _drain() -> None:
    """Send the logs and events Prefect still holds while its server is up (after, each batch prints
    `--- Error logging to API ---`)."""
    if "prefect" not in sys.modules:
        return
    from prefect._internal.concurrency.services import QueueService

    with contextlib.suppress(Exception):
        QueueService.drain_all(timeout=10)


