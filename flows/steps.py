"""Runs pipeline steps as Prefect tasks and records one row per step (duration, files, bytes,
throughput, attempts), shown as a table artifact. Only errors marked transient are retried."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import defaultdict

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run
from prefect.tasks import exponential_backoff

from modelferry.tasks.errors import ModelferryError, StepFailed, first_line
from modelferry.tasks.settings import scrub
from modelferry.tasks.plan import StepStats

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


def step(name: str, retries: int = 3, timeout_s: float | None = None):
    """Wrap a plain function as a pipeline step: a Prefect task with backoff retries on transient
    errors, each attempt under `timeout_s` when given. These retries are the only retry layer: the
    clients underneath (botocore, s5cmd) make one attempt each. The function returns StepStats,
    or (value, StepStats)."""

    def wrap(fn):
        @functools.wraps(fn)  # keeps the signature: Prefect binds parameters by name (Dask submits)
        def counted(*args, **kwargs):
            _attempts[(flow_run.id, name)] += 1
            return fn(*args, **kwargs)

        base = float(os.environ.get("MODELFERRY_RETRY_BASE_S", "2"))
        return task(counted, name=name, retries=retries, retry_delay_seconds=exponential_backoff(base),
                    retry_condition_fn=_transient, cache_policy=NO_CACHE, persist_result=False,
                    timeout_seconds=timeout_s)

    return wrap


work_clock: dict[str, float] = {}  # perf_counter when a flow's body started and ended, in this process


def mark_work(edge: str) -> None:
    work_clock[edge] = time.perf_counter()
    work_clock[f"{edge}_cpu"] = time.process_time()


def startup_report(t0: float, cpu0: float, where: str) -> str:
    """How long orchestration took to start (imports, Prefect API, flow run) against the work itself,
    given `t0` and `cpu0` (perf_counter and process_time) taken before the flow's module was imported,
    and `where` the Prefect API is."""
    start, end = work_clock.get("started"), work_clock.get("ended")
    if start is None:
        return f"finished in {time.perf_counter() - t0:.1f} s ({where})"
    work = (end or time.perf_counter()) - start
    cpu = work_clock["started_cpu"] - cpu0
    return f"orchestration start-up {start - t0:.2f} s, {cpu:.2f} CPU-s ({where}), work {work:.2f} s"


class Steps:
    """Call steps in order; on failure record the failed row, publish the table, and raise StepFailed."""

    def __init__(self, artifact_key: str, title: str):
        self.rows: list[dict] = []
        self.key = artifact_key
        self.title = title

    def __call__(self, step_task, *args, name: str | None = None, **kwargs):
        """Run `step_task` (a step, or any callable returning StepStats / (value, StepStats)). A task
        that runs several steps at once returns a list of StepStats timed by itself, and names the
        step an error belongs to in the error's `step` attribute."""
        name = name or step_task.name
        started = time.perf_counter()
        try:
            out = step_task(*args, **kwargs)
        except Exception as exc:
            failed = getattr(exc, "step", None) or name
            stats = StepStats(failed, status="failed", note=scrub(first_line(exc)))
            self._record(stats, started, name)
            self.publish()
            raise StepFailed(f"step {failed} failed: {scrub(str(exc))}", self.rows, exc) from exc
        value, stats = out if isinstance(out, tuple) else (None, out)
        attempts = max(1, _attempts.pop((flow_run.id, name), 1))
        for one in stats if isinstance(stats, list) else [stats]:
            self._record(one, started, name, attempts, timed=isinstance(stats, list))
        return value

    def _record(self, stats: StepStats, started: float, name: str, attempts: int | None = None, timed: bool = False) -> None:
        if not timed:
            stats.seconds = round(time.perf_counter() - started, 3)
        stats.attempts = attempts or max(1, _attempts.pop((flow_run.id, name), 1))
        stats.mb_per_s = round(stats.bytes / 1e6 / stats.seconds, 1) if stats.bytes and stats.seconds else None
        self.rows.append(stats.row())

    def markdown(self) -> str:
        """The rows as a Markdown table (tabulate: pandas would add half a second of import here)."""
        from tabulate import tabulate

        return tabulate(self.rows, headers="keys", tablefmt="pipe")

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
