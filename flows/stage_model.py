"""Flow `stage-model`: resolve -> download -> local_verify -> upload -> remote_verify -> publish."""

from __future__ import annotations

from prefect import flow

from flows.steps import Steps, progress_reporter, step
from tasks import settings as config
from tasks import staging


@step("resolve")
def resolve(source, revision, include, exclude, name, allow_unloadable, replace):
    return staging.resolve(config.load(), source, revision, include, exclude, name, allow_unloadable, replace)


@step("download")
def download(plan):
    return staging.download(config.load(), plan)


@step("local_verify", retries=0)
def local_verify(plan):
    return staging.local_verify(plan)


@step("upload")
def upload(plan, replace):
    return staging.upload(config.load(), plan, progress_reporter(f"upload {plan.name}@{plan.revision[:12]}"), replace)


@step("remote_verify", retries=1)
def remote_verify(plan):
    return staging.remote_verify(config.load(), plan)


@step("publish")
def publish(plan, manifest, set_current):
    return staging.publish(config.load(), plan, manifest, set_current)


@flow(name="stage-model", log_prints=False)
def stage_model(source: str, revision: str | None = None, include: list[str] | None = None,
                exclude: list[str] | None = None, name: str | None = None, allow_unloadable: bool = False,
                replace: bool = False, set_current: bool = True) -> list[dict]:
    """Stage a Hub repo (org/name) or a local checkpoint directory into the bucket, verified.

    Credentials come from the environment (R2_*, HF_TOKEN), never from parameters."""
    steps = Steps("stage-steps", f"stage {source}")
    include, exclude = list(include or []), list(exclude or [])
    plan = steps(resolve, source, revision, include, exclude, name, allow_unloadable, replace)
    try:  # resolve took the revision's lock in the bucket: one writer per revision
        steps(download, plan)
        steps(local_verify, plan)
        steps(upload, plan, replace)
        manifest = steps(remote_verify, plan)
        steps(publish, plan, manifest, set_current)
    finally:
        staging.release(plan)
    steps.publish(summary=_summary(plan, steps))
    return steps.rows


def _summary(plan, steps: Steps) -> str:
    uri = f"s3://{config.load().bucket}/{plan.prefix}"
    return (f"## Staged `{plan.name}` @ `{plan.revision}`\n\n"
            f"- load it with: `vllm serve {uri} --load-format runai_streamer`\n"
            f"- files: {len(plan.files)}, bytes: {sum(f.size for f in plan.files):,}\n\n"
            + steps.table().to_markdown(index=False))
