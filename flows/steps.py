"""Runs pipeline steps as Prefect tasks and records one row per step (duration, files, bytes,
throughput, attempts), shown as a table artifact. Only errors marked transient are retried."""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run
from prefect.tasks import exponential_backoff

from tasks.errors import ModelferryError
from tasks.settings import scrub
from tasks.staging import StepStats

_attempts: dict[tuple, int] = defaultdict(int)


class _OneLineForOurErrors(logging.Filter):
    """Our typed errors already say what to fix in one line: keep Prefect from adding a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        while exc is not None and not isinstance(exc, ModelferryError):
            exc = exc.__cause__
        if exc is not None:
            record.exc_info = None
            record.exc_text = None
        return True


for _name in ("prefect.task_runs", "prefect.flow_runs", "prefect.task_engine", "prefect.flow_engine"):
    logging.getLogger(_name).addFilter(_OneLineForOurErrors())


def _transient(task, run, state) -> bool:
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - only asking whether it is worth a retry
        return bool(getattr(exc, "transient", False))
    return False


def step(name: str, retries: int = 3):
    """Wrap a plain function as a pipeline step: a Prefect task with backoff retries on transient
    errors. The function returns StepStats, or (value, StepStats)."""

    def wrap(fn):
        def counted(*args, **kwargs):
            _attempts[(flow_run.id, name)] += 1
            return fn(*args, **kwargs)

        counted.__name__ = counted.__qualname__ = fn.__name__
        counted.__doc__ = fn.__doc__
        base = float(os.environ.get("MODELFERRY_RETRY_BASE_S", "2"))
        return task(counted, name=name, retries=retries, retry_delay_seconds=exponential_backoff(base),
                    retry_condition_fn=_transient, cache_policy=NO_CACHE, persist_result=False)

    return wrap


class StepFailed(ModelferryError):
    """A step failed; carries the rows recorded so far (the failed one last)."""

    def __init__(self, message: str, rows: list[dict], cause: BaseException):
        super().__init__(message)
        self.rows = rows
        self.cause = cause


class Steps:
    """Call steps in order; on failure record the failed row, publish the table, and raise StepFailed."""

    def __init__(self, artifact_key: str, title: str):
        self.rows: list[dict] = []
        self.key = artifact_key
        self.title = title

    def __call__(self, step_task, *args, name: str | None = None, **kwargs):
        """Run `step_task` (a step, or any callable returning StepStats / (value, StepStats))."""
        name = name or step_task.name
        started = time.perf_counter()
        try:
            out = step_task(*args, **kwargs)
        except Exception as exc:
            stats = StepStats(name, status="failed", note=scrub(str(exc)).splitlines()[0][:300] if str(exc) else type(exc).__name__)
            self._record(stats, started, name)
            self.publish()
            raise StepFailed(f"step {name} failed: {scrub(str(exc))}", self.rows, exc) from exc
        value, stats = out if isinstance(out, tuple) else (None, out)
        self._record(stats, started, name)
        return value

    def _record(self, stats: StepStats, started: float, name: str) -> None:
        stats.seconds = round(time.perf_counter() - started, 3)
        stats.attempts = max(1, _attempts.pop((flow_run.id, name), 1))
        stats.mb_per_s = round(stats.bytes / 1e6 / stats.seconds, 1) if stats.bytes and stats.seconds else None
        self.rows.append(stats.row())

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def publish(self, summary: str = "") -> None:
        """Table artifact of the steps (and a markdown summary) on the flow run."""
        if not flow_run.id:
            return
        create_table_artifact(table=self.rows, key=self.key, description=self.title)
        if summary:
            create_markdown_artifact(markdown=summary, key=f"{self.key}-summary", description=self.title)


def progress_reporter(description: str):
    """A Prefect progress artifact updated at most once a second; returns a callable(percent)."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    if not task_run.id:
        return lambda pct: None
    artifact_id = create_progress_artifact(progress=0.0, description=description)
    last = [0.0]

    def report(pct: float) -> None:
        now = time.monotonic()
        if pct >= 100 or now - last[0] >= 1:
            last[0] = now
            update_progress_artifact(artifact_id=artifact_id, progress=min(pct, 100.0))

    return report
