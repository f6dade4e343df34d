"""Flow `stage-and-launch`: stage -> verify -> then per strategy: launch -> bench -> teardown.

The CLI's `launch` and `bench` run it with `stage=False`. The flow prepares each deployment, holds it,
and hands it to the launch step, the warm runs and the teardown, which runs in every failure path
unless `keep`; deployment names derive from the flow run id, so a retried step never provisions twice.
With `strategy="both"` one strategy's node is down before the next one starts, so no start is
measured while another node still holds the machine.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from modelferry.flows.stage_model import stage_model
from modelferry.flows.steps import Steps, step
from modelferry.tasks.launch import launcher
from modelferry.tasks.measure import results
from modelferry.tasks.records import catalog, layout
from modelferry.tasks.staging import request
from modelferry.tasks import settings as config
from modelferry.tasks.clients.bucket import Bucket
from modelferry.tasks.errors import SettingsError
from modelferry.tasks.launch.launcher import Deployment
from modelferry.tasks.launch.options import LaunchOptions
from modelferry.tasks.staging.plan import StepStats
from modelferry.tasks.measure.results import StartRow

log = logging.getLogger("modelferry.launch")


@dataclass(frozen=True)
class Run:
    """One measured start: its phase row and the node's log it was read from."""

    row: StartRow
    log: str


def _staged_name(model: str, name: str | None, include: list[str], exclude: list[str]) -> str:
    """The org/name a stage of `model` publishes, checked before anything starts. A local checkpoint
    must be on the machine this flow runs on (a deployment's worker), and the error says which."""
    try:
        return request.check(model, name, include, exclude, allow_unloadable=False).name
    except SettingsError as exc:
        raise SettingsError(f"{exc} (checked on {socket.gethostname()}, where this flow runs)") from None


def _stage(source, revision, include, exclude, name):
    staged = stage_model(source, revision=revision, include=include, exclude=exclude, name=name)
    rows = staged.rows
    stats = StepStats("stage", files=max(r["files"] for r in rows), attempts=1,
                      bytes=sum(r["bytes"] for r in rows if r["step"] in ("download", "upload")),
                      note=f"sent {sum(r['bytes'] for r in rows if r['step'] == 'upload'):,} bytes")
    return staged.revision, stats


@step("verify")
def verify(model, revision):
    record = catalog.verify(Bucket(config.load()), model, revision)
    return record["revision"], StepStats("verify", files=record["files"], note="size + ETag of every object")


@step("launch", retries=1)
def launch(dep: Deployment):
    """Start `dep` (a retry starts the same deployment again, on the same node), wait until it serves
    and answers one completion, and measure the cold start."""
    launcher.start(dep)
    if dep.options.mode == "job":  # managed jobs expose no endpoint; SkyPilot's controller owns the job
        dep.kept = True
        return Run(launcher.measure(dep, "cold", 1), ""), StepStats("launch", note=f"managed job {dep.cluster} submitted")
    launcher.wait_ready(dep, dep.options.ready_timeout)
    text = launcher.first_token(dep)
    log.info("%s answers at %s: %r", dep.cluster, dep.url, text[:120])
    run = _measured(dep, "cold", 1)
    return run, StepStats("launch", note=f"{dep.weights}/{run.row.strategy} ready in {run.row.total_s:.2f} s")


def _measured(dep: Deployment, kind: str, n: int) -> Run:
    """The run's row; a cold run first lets its node save the compile cache, so the next fresh node can restore it."""
    if kind == "cold":
        launcher.wait_cache_saved(dep)
    return Run(launcher.measure(dep, kind, n), dep.handle.log())


@step("bench", retries=0)
def warm_runs(dep: Deployment, runs: int):
    """Runs 2..runs: the serving job restarted on the same node (same disk, same caches)."""
    measured = []
    for n in range(2, runs + 1):
        launcher.restart(dep)
        launcher.wait_ready(dep, dep.options.ready_timeout)
        launcher.first_token(dep)
        measured.append(_measured(dep, "warm", n))
    return measured, StepStats("bench", files=len(measured), note=f"{len(measured)} warm restart(s) of {dep.cluster}")


@flow(name="stage-and-launch", log_prints=False)
def stage_and_launch(model: str, revision: str | None = None, name: str | None = None, target: str = "local",
                     source: str = "auto", mode: str = "cluster", strategy: str = "stream",
                     accelerators: list[str] | None = None, concurrency: int | None = None, compile_cache: bool = True,
                     vllm_image: str | None = None, ready_timeout: float = 1800, max_model_len: int | None = None,
                     memory_limit: int | None = None, memory: str | None = None, idle_minutes: int = 30,
                     use_spot: bool = True, ondemand_fallback: bool = False, disk_size: int | None = None, extra_vllm_args: str = "", runs: int = 1,
                     stage: bool = True,
                     include: list[str] | None = None, exclude: list[str] | None = None, keep: bool = False,
                     results_dir: str = "results") -> Launched:
    """Stage a model (optional), verify it, launch it where it streams its weights from the bucket,
    and time every phase of each start. Returns the phase rows (one per run) and where they were saved.

    `model` is a Hub repo id (org/name), or with `name` a local checkpoint directory on the machine the
    flow runs on, staged and launched as `name`. The launch options are `LaunchOptions`' fields."""
    options = LaunchOptions.pick(locals())
    options.check()  # before staging: a bad option costs no transfer
    if runs < 1:
        raise SettingsError("runs must be at least 1")
    include, exclude = list(include or []), list(exclude or [])
    if stage:
        source_dir_or_repo, model = model, _staged_name(model, name, include, exclude)
    steps = Steps("stage-and-launch-steps", f"stage-and-launch {model}")
    run_id = str(flow_run.id or uuid.uuid4())
    measured: list[Run] = []
    live: list[Deployment] = []  # held from prepare to teardown: a launch that fails after starting a node is torn down
    try:
        if stage:
            revision = steps(_stage, source_dir_or_repo, revision, include, exclude, name, name="stage")
        if source != "hub":
            try:
                revision = steps(verify, model, revision)
            except Exception:
                if source == "r2":
                    raise
                log.warning("%s is not staged or not verified: launch decides the source", model)
        for each in options.each_strategy():  # one at a time: each start is measured on a machine of its own
            live.append(steps.before("launch", launcher.prepare, config.load(), model, revision, each,
                                     f"{run_id}-{each.strategy}", keep))
            measured.append(steps(launch, live[-1]))
            if runs > 1:
                measured += steps(warm_runs, live[-1], runs)
            _teardown(live.pop())
    finally:
        for dep in live:
            _teardown(dep)
        saved = _saved(steps, measured, model, Path(results_dir), run_id)
    steps.publish()
    return Launched([m.row.record() for m in measured], saved)


def _teardown(dep: Deployment) -> None:
    if dep.kept:
        log.info("kept: %s: %s (take it down sooner with `modelferry down %s`)", dep.cluster,
                 launcher.when_it_stops(dep), dep.cluster)
        return
    if dep.handle is None:  # never started
        return
    try:
        dep.handle.stop()
    except Exception as exc:  # noqa: BLE001 - take down the others, then say what is left
        log.error("teardown of %s failed: %s; take it down with `modelferry down %s`", dep.cluster, exc, dep.cluster)


def _saved(steps: Steps, measured: list[Run], model: str, results_root: Path, run_id: str) -> dict | None:
    if not measured:
        return None
    try:
        return _report(steps, measured, model, results_root, run_id)
    except Exception as exc:  # noqa: BLE001 - the runs happened; don't hide them or the cause
        log.error("could not write the results: %s", exc)
        return None


@dataclass(frozen=True)
class Launched:
    rows: list[dict]  # phase rows, one per run (StartRow's records)
    saved: dict | None  # {"dir", "png", "note"} of the results written, None when none were


def _report(steps: Steps, measured: list[Run], model: str, results_root: Path, run_id: str) -> dict:
    """Each run's rows to its own Parquet file (locally and under bench/ in the bucket), a plot,
    artifacts. Returns where they went."""
    import pandas as pd

    bench_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + run_id[:8]
    out = results_root / model.replace("/", "--") / bench_id
    bucket = Bucket(config.load())
    for run in measured:
        path = results.save_run([run.row], out, f"{run.row.strategy}-run{run.row.run}")
        bucket.put_bytes(layout.bench_prefix(model, bench_id) + path.name, path.read_bytes())
        if run.log:  # the node's log the row was read from
            path.with_suffix(".log").write_text(run.log)
    df = results.read_results(out).sort_values(["strategy", "run"])
    png = results.plot(df, out / "phases.png", f"{model}: cold start by phase")
    bucket.put_bytes(layout.bench_prefix(model, bench_id) + "phases.png", png.read_bytes(), "image/png")
    note = results.winner(df) or ""
    log.info("results in %s (and %s)%s", out, bucket.uri(layout.bench_prefix(model, bench_id)), f"; {note}" if note else "")
    if flow_run.id:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        create_table_artifact(table=pd.DataFrame(df).astype(object).where(df.notna(), None).to_dict("records"),
                              key="cold-start-phases", description=f"cold start phases of {model}")
        create_markdown_artifact(markdown=results.markdown(df, png, note), key="cold-start-summary",
                                 description=f"cold start of {model}")
    return {"dir": str(out), "png": str(png), "note": note}
