"""Flow `stage-and-launch`: stage -> verify -> launch -> bench -> teardown.

The CLI's `launch` and `bench` run it with `stage=False`. Teardown runs in every failure path
unless `keep`; cluster names derive from the flow run id, so a retried step never provisions twice.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from modelferry.flows.stage_model import stage_model
from modelferry.flows.steps import Steps, step
from modelferry.tasks import bench, catalog, launcher
from modelferry.tasks import settings as config
from modelferry.tasks.bucket import Bucket
from modelferry.tasks.errors import SettingsError
from modelferry.tasks.sky import LaunchOptions, check_launch, launch_options
from modelferry.tasks.plan import StepStats

log = logging.getLogger("modelferry.launch")


def _stage(model, revision, include, exclude):
    staged = stage_model(model, revision=revision, include=include, exclude=exclude)
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
def launch(model, revision, target, source, options_dict, run_id):
    dep = launcher.plan(config.load(), model, revision, target, source, LaunchOptions(**options_dict), run_id)
    known = next((d for d in _deployments if d.name == dep.name), None)
    if known:  # a retry: same name, same node
        dep = known
    else:
        _deployments.append(dep)
    launcher.start(dep)
    if dep.options.mode == "job":  # managed jobs expose no endpoint; SkyPilot's controller owns the job
        dep.kept = True
        return launcher.measure(dep, "cold", 1), StepStats("launch", note=f"managed job {dep.name} submitted")
    launcher.wait_ready(dep, dep.options.ready_timeout)
    text = launcher.first_token(dep)
    log.info("%s answers at %s: %r", dep.name, dep.url, text[:120])
    row = _measured(dep, "cold", 1)
    return row, StepStats("launch", note=f"{dep.source}/{row['strategy']} ready in {row['total_s']:.2f} s")


def _measured(dep, kind: str, run: int) -> dict:
    """The run's row; a cold run first lets its node save the compile cache, so the next fresh node can restore it."""
    if kind == "cold":
        launcher.wait_cache_saved(dep)
    row = launcher.measure(dep, kind, run)
    _logs[f"{row['strategy']}-run{run}"] = launcher.job_log(dep)
    return row


@step("bench", retries=0)
def warm_runs(runs):
    rows = []
    for dep in list(_deployments):
        for n in range(2, runs + 1):
            launcher.restart(dep)
            launcher.wait_ready(dep, dep.options.ready_timeout)
            launcher.first_token(dep)
            rows.append(_measured(dep, "warm", n))
    return rows, StepStats("bench", files=len(rows), note=f"{len(rows)} warm restart(s)")


_deployments: list[launcher.Deployment] = []
_logs: dict[str, str] = {}  # each run's job log, kept beside its results


@flow(name="stage-and-launch", log_prints=False)
def stage_and_launch(model: str, revision: str | None = None, target: str = "local", mode: str = "cluster",
                     source: str = "auto", strategy: str = "stream", accelerators: list[str] | None = None,
                     runs: int = 1, stage: bool = True, include: list[str] | None = None,
                     exclude: list[str] | None = None, keep: bool = False, concurrency: int = 32,
                     results_dir: str = "results", ready_timeout: float = 1800,
                     compile_cache: bool = True, vllm_image: str | None = None, headroom: float = 1.3,
                     memory_limit: int = -1, idle_minutes: int = 30, use_spot: bool = True,
                     disk_size: int | None = None, extra_vllm_args: str = "") -> Launched:
    """Stage a model (optional), verify it, launch it where it streams its weights from the bucket,
    and time every phase of each start. Returns the phase rows (one per run) and where they were saved."""
    if runs < 1:
        raise SettingsError("runs must be at least 1")
    steps = Steps("stage-and-launch-steps", f"stage-and-launch {model}")
    run_id = str(flow_run.id or uuid.uuid4())
    strategies = ["stream", "prefetch"] if strategy == "both" else [strategy]
    options = {strat: launch_options(
        mode=mode, strategy=strat, accelerators=accelerators, concurrency=concurrency, ready_timeout=ready_timeout,
        compile_cache=compile_cache, vllm_image=vllm_image, headroom=headroom, memory_limit=memory_limit,
        idle_minutes=idle_minutes, use_spot=use_spot, disk_size=disk_size, extra_vllm_args=extra_vllm_args)
        for strat in strategies}
    for opts in options.values():  # before staging: a bad option costs no transfer
        check_launch(target, source, opts)
    phase_rows: list[dict] = []
    saved: dict | None = None
    _deployments.clear()
    _logs.clear()
    try:
        if stage:
            revision = steps(_stage, model, revision, include or [], exclude or [], name="stage")
        if source != "hub":
            try:
                revision = steps(verify, model, revision)
            except Exception:
                if source == "r2":
                    raise
                log.warning("%s is not staged or not verified: launch decides the source", model)
        for strat in strategies:
            phase_rows.append(steps(launch, model, revision, target, source, asdict(options[strat]),
                                    f"{run_id}-{strat}"))
        if runs > 1:
            phase_rows += steps(warm_runs, runs)
    finally:
        for dep in _deployments:
            if keep or dep.kept:
                log.info("kept: %s (take down with `modelferry down %s`)", dep.name, dep.name)
                continue
            try:
                launcher.teardown(dep)
            except Exception as exc:  # noqa: BLE001 - take down the others, then say what is left
                log.error("teardown of %s failed: %s; take it down with `modelferry down %s`", dep.name, exc, dep.name)
        if phase_rows:
            try:
                saved = _report(steps, phase_rows, model, Path(results_dir), run_id)
            except Exception as exc:  # noqa: BLE001 - the runs happened; don't hide them or the cause
                log.error("could not write the results: %s", exc)
    steps.publish()
    return Launched(phase_rows, saved)


@dataclass(frozen=True)
class Launched:
    rows: list[dict]  # phase rows, one per run
    saved: dict | None  # {"dir", "png", "note"} of the results written, None when none were


def _report(steps: Steps, rows: list[dict], model: str, results_root: Path, run_id: str) -> dict:
    """Each run's rows to its own Parquet file (locally and under bench/ in the bucket), a plot,
    artifacts. Returns where they went."""
    import pandas as pd

    bench_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + run_id[:8]
    out = results_root / model.replace("/", "--") / bench_id
    bucket = Bucket(config.load())
    for row in rows:
        path = bench.save_run([row], out, f"{row['strategy']}-run{row['run']}")
        bucket.put_bytes(f"bench/{model}/{bench_id}/{path.name}", path.read_bytes())
    for name, text in _logs.items():  # the node's log each row was read from
        (out / f"{name}.log").write_text(text)
    df = bench.read_results(out).sort_values(["strategy", "run"])
    png = bench.plot(df, out / "phases.png", f"{model}: cold start by phase")
    bucket.put_bytes(f"bench/{model}/{bench_id}/phases.png", png.read_bytes(), "image/png")
    note = bench.winner(df) or ""
    log.info("results in %s (and s3://%s/bench/%s/%s/)%s", out, bucket.name, model, bench_id, f"; {note}" if note else "")
    if flow_run.id:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        create_table_artifact(table=pd.DataFrame(df).astype(object).where(df.notna(), None).to_dict("records"),
                              key="cold-start-phases", description=f"cold start phases of {model}")
        create_markdown_artifact(markdown=bench.markdown(df, png, note), key="cold-start-summary",
                                 description=f"cold start of {model}")
    return {"dir": str(out), "png": str(png), "note": note}
