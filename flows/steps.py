"""Runs pipeline steps as Prefect tasks and records one row per step (duration, files, bytes,
throughput, attempts), shown as a table artifact. Only errors marked transient are retried."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run
from prefect.tasks import exponential_backoff

from modelferry.tasks.errors import LastAttempt, ModelferryError, StepFailed, first_line
from modelferry.tasks.settings import VARIABLES, read, scrub
from modelferry.tasks.staging.plan import StepStats

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


_ONE_LINE = _OneLineForOurErrors()


def one_line_errors() -> None:
    """Put the filter on Prefect's run loggers, once per process: when a flow starts or a step runs
    (on a Dask worker too), not when this module is imported."""
    for name in ("prefect.task_runs", "prefect.flow_runs", "prefect.task_engine", "prefect.flow_engine"):
        logger = logging.getLogger(name)
        if _ONE_LINE not in logger.filters:
            logger.addFilter(_ONE_LINE)


def _transient(task, run, state) -> bool:
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - only asking whether it is worth a retry
        return bool(getattr(exc, "transient", False))
    return False


RETRY_BASE_S = float(next(v.default for v in VARIABLES if v.name == "MODELFERRY_RETRY_BASE_S"))


def configured(step_task):
    """`step_task` with the retry waits MODELFERRY_RETRY_BASE_S asks for, read when it runs."""
    base = read("MODELFERRY_RETRY_BASE_S")
    if not getattr(step_task, "retries", 0) or base == RETRY_BASE_S:
        return step_task
    return step_task.with_options(retry_delay_seconds=exponential_backoff(base))


def step(name: str, retries: int = 3, timeout_s: float | None = None):
    """Wrap a plain function as a pipeline step: a Prefect task with backoff retries on transient
    errors, each attempt under `timeout_s` when given. These retries are the only retry layer: the
    clients underneath (botocore, s5cmd) make one attempt each. The function returns StepStats,
    or (value, StepStats); the step stamps each StepStats with the attempts it took."""

    def wrap(fn):
        @functools.wraps(fn)  # keeps the signature: Prefect binds parameters by name (Dask submits)
        def attempt(*args, **kwargs):
            one_line_errors()
            try:
                out = fn(*args, **kwargs)
            except Exception as exc:
                if getattr(exc, "transient", False) and task_run.run_count <= retries:
                    raise  # Prefect retries it
                raise LastAttempt(exc, task_run.run_count) from exc
            stats = out[-1] if isinstance(out, tuple) else out
            for one in stats if isinstance(stats, list) else [stats]:
                if isinstance(one, StepStats):  # a step called outside Steps may return a plain value
                    one.attempts = task_run.run_count
            return out

        # The declared default here; `configured` applies MODELFERRY_RETRY_BASE_S when the step runs.
        return task(attempt, name=name, retries=retries, retry_delay_seconds=exponential_backoff(RETRY_BASE_S),
                    retry_condition_fn=_transient, cache_policy=NO_CACHE, persist_result=False,
                    timeout_seconds=timeout_s)

    return wrap


@dataclass(frozen=True)
class WorkClock:
    """When a flow's own work started and ended (perf_counter), and the CPU time spent before it."""

    started: float
    started_cpu: float
    ended: float | None = None

    @classmethod
    def now(cls) -> WorkClock:
        return cls(time.perf_counter(), time.process_time())

    def stop(self) -> WorkClock:
        return WorkClock(self.started, self.started_cpu, time.perf_counter())


def startup_report(t0: float, cpu0: float, where: str, clock: WorkClock | None) -> str:
    """How long orchestration took to start (imports, Prefect API, flow run) against the work itself,
    given `t0` and `cpu0` (perf_counter and process_time) taken before the flow's module was imported,
    `where` the Prefect API is, and the flow's `clock` (None when it returned none)."""
    if clock is None:
        return f"finished in {time.perf_counter() - t0:.1f} s ({where})"
    work = (clock.ended or time.perf_counter()) - clock.started
    return (f"orchestration start-up {clock.started - t0:.2f} s, {clock.started_cpu - cpu0:.2f} CPU-s ({where}), "
            f"work {work:.2f} s")


class Steps:
    """Call steps in order; on failure record the failed row, publish the table, and raise StepFailed."""

    def __init__(self, artifact_key: str, title: str):
        one_line_errors()
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
            out = configured(step_task)(*args, **kwargs)
        except LastAttempt as last:
            self._fail(last.cause, name, started, last.attempts)
        except Exception as exc:
            self._fail(exc, name, started, 1)
        value, stats = out if isinstance(out, tuple) else (None, out)
        for one in stats if isinstance(stats, list) else [stats]:
            self._record(one, started, timed=isinstance(stats, list))
        return value

    def before(self, name: str, fn, *args, **kwargs):
        """Run `fn`, the part of step `name` that the flow runs itself before the step (preparing what
        the step gets): a failure is that step's failed row; success records nothing."""
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self._fail(exc, name, started, 1)

    def _fail(self, exc: Exception, name: str, started: float, attempts: int):
        failed = (exc.step if isinstance(exc, ModelferryError) else None) or name
        self._record(StepStats(failed, status="failed", note=scrub(first_line(exc))), started, attempts)
        self.publish()
        raise StepFailed(f"step {failed} failed: {scrub(str(exc))}", self.rows, exc) from exc

    def _record(self, stats: StepStats, started: float, attempts: int | None = None, timed: bool = False) -> None:
        if not timed:
            stats.seconds = round(time.perf_counter() - started, 3)
        stats.attempts = attempts or stats.attempts or 1
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
    """A Prefect progress artifact updated at most once a second; returns a callable(percent, line):
    `line` (bytes, rate, time left) becomes the artifact's description under `description`."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    if not task_run.id:
        return lambda pct, line=None: None
    artifact_id = create_progress_artifact(progress=0.0, description=description)
    last = [0.0]

    def report(pct: float, line: str | None = None) -> None:
        now = time.monotonic()
        if pct >= 100 or line or now - last[0] >= 1:
            last[0] = now
            update_progress_artifact(artifact_id=artifact_id, progress=min(pct, 100.0),
                                     description=f"{description}: {line}" if line else None)

    return report
