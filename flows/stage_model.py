"""Flow `stage-model`: resolve -> download -> local_verify -> upload -> remote_verify -> publish.

download, local_verify and upload run as one pipelined task (`transfer`): each file is uploaded as
soon as its own bytes are verified, while the next is downloaded or hashed. It still reports one row
per step."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prefect import flow

from modelferry.flows.steps import Steps, WorkClock, configured, progress_reporter, step
from modelferry.tasks.staging import in_bucket, pipeline, publish as publishing, resolve as resolving, shards
from modelferry.tasks import settings as config
from modelferry.tasks.clients.bucket import Bucket
from modelferry.tasks.errors import SettingsError, require_extra
from modelferry.tasks.records.lock import Lock
from modelferry.tasks.staging.survey import survey

log = logging.getLogger("modelferry.stage")


@dataclass(frozen=True)
class Staged:
    """What one stage did: the revision it published (a branch or tag resolved to its commit) and
    one row per step."""
    name: str
    revision: str
    uri: str
    rows: list[dict]
    clock: WorkClock  # the flow's own work, for the start-up report


@step("resolve", timeout_s=600)
def resolve(source, revision, include, exclude, name, allow_unloadable):
    return resolving.resolve(config.load(), source, revision, include, exclude, name, allow_unloadable)


def _survey_and_prepare(plan, replace) -> tuple[int, str]:
    """What the bucket already holds; strays removed, unchanged files copied inside it."""
    bucket = Bucket(config.load())
    bucket.probe()  # a retried transfer against an endpoint that died fails here, at once
    note = survey(bucket, plan, replace)
    log.info("%s@%s: %s", plan.name, plan.revision[:12], note)
    return in_bucket.prepare(bucket, plan), note


@step("transfer")
def transfer(plan, replace):
    copied, _ = _survey_and_prepare(plan, replace)
    return pipeline.transfer(config.load(), plan, progress_reporter(f"upload {plan.name}@{plan.revision[:12]}"),
                             copied=copied)


@step("transfer-shard")
def transfer_shard(part):
    """One Dask worker's share: its files downloaded, verified, uploaded and proven."""
    return part.files, pipeline.transfer(config.load(), shards.on_this_machine(part), keep_downloads=False)


def transfer_on_dask(plan, replace, address: str | None):
    """Shard the files to fetch across the Dask cluster at `address` (a local one when None), one
    share of about equal bytes per worker. Returns one row per step, summed over the shares."""
    from prefect_dask import DaskTaskRunner

    copied, _ = _survey_and_prepare(plan, replace)
    todo = plan.to_fetch()
    if not todo:
        return pipeline.transfer(config.load(), plan, copied=copied)
    with DaskTaskRunner(address=address) as runner:
        workers = len(runner.client.scheduler_info()["workers"])
        parts = shards.split(todo, workers)
        log.info("%d file(s) in %d share(s) over %d Dask worker(s)", len(todo), len(parts), workers)
        futures = [runner.submit(configured(transfer_shard), {"part": shards.shard(plan, p)}) for p in parts]
        results, errors = [], []
        for future in futures:
            try:
                results.append(future.result())
            except Exception as exc:  # noqa: BLE001 - every share finishes; the first error is reported
                errors.append(exc)
    for files, _ in results:
        shards.merge(plan, files)
    if errors:
        raise errors[0]
    return shards.combine([rows for _, rows in results], copied, f"{len(parts)} shards on Dask")


@step("remote_verify", retries=1, timeout_s=600)
def remote_verify(plan):
    return publishing.remote_verify(config.load(), plan)


@step("publish", timeout_s=300)
def publish(plan, manifest, set_current):
    return publishing.publish(config.load(), plan, manifest, set_current)


@flow(name="stage-model", log_prints=False)
def stage_model(source: str, revision: str | None = None, include: list[str] | None = None,
                exclude: list[str] | None = None, name: str | None = None, allow_unloadable: bool = False,
                replace: bool = False, set_current: bool = True, task_runner: str = "thread",
                dask_address: str | None = None) -> Staged:
    """Stage a Hub repo (org/name) or a local checkpoint directory into the bucket, verified.

    `task_runner="dask"` shards the transfer across the Dask cluster at `dask_address` (a local
    cluster when empty): each worker downloads, verifies, uploads and proves its own files, and the
    manifest is still written once, last, here. Credentials come from the environment (R2_*,
    HF_TOKEN) of each process, never from parameters."""
    clock = WorkClock.now()
    if task_runner not in ("thread", "dask"):
        raise SettingsError(f"unknown task_runner {task_runner!r}: choose thread or dask")
    if task_runner == "dask":
        require_extra("prefect_dask", "dask", "task_runner dask")
    bucket = Bucket(config.load())
    bucket.probe()  # one request, not retried: a wrong endpoint or key fails here, in a second
    steps = Steps("stage-steps", f"stage {source}")
    include, exclude = list(include or []), list(exclude or [])
    plan = steps(resolve, source, revision, include, exclude, name, allow_unloadable)
    with Lock(bucket, plan.name, plan.revision).held(log=log) as lock:  # one writer per revision
        if task_runner == "dask":
            steps(transfer_on_dask, plan, replace, dask_address, name="transfer")
        else:
            steps(transfer, plan, replace)
        manifest = steps(remote_verify, plan)
        lock.check()
        steps(publish, plan, manifest, set_current)
    clock = clock.stop()
    uri = bucket.uri(plan.prefix)
    steps.publish(summary=_summary(plan, uri, steps))
    return Staged(plan.name, plan.revision, uri, steps.rows, clock)


def _summary(plan, uri: str, steps: Steps) -> str:
    return (f"## Staged `{plan.name}` @ `{plan.revision}`\n\n"
            f"- load it with: `vllm serve {uri} --load-format runai_streamer`\n"
            f"- files: {len(plan.files)}, bytes: {sum(f.size for f in plan.files):,}\n\n"
            + steps.markdown())
