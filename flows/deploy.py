"""`modelferry deploy`: create the two Prefect deployments from the installed package, without a
checkout or prefect.yaml. Their entrypoints are module paths (`modelferry.flows....`), so a process
worker in any environment where modelferry is installed runs them, from any directory."""

from __future__ import annotations

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments.runner import EntrypointType
from prefect.exceptions import ObjectAlreadyExists
from prefect.schedules import Cron

from modelferry.flows import PROCESS_DEFAULTS
from modelferry.flows.model_refresh import model_refresh
from modelferry.flows.stage_and_launch import stage_and_launch
from modelferry.tasks import pins



def ensure_pool(pool: str) -> None:
    """A process work pool named `pool`; an existing one (of any type) is left as it is."""
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        except ObjectAlreadyExists:
            pass


def deploy(pool: str, watchlist: str | None = None, cron: str = pins.NIGHTLY, launch_name: str = "default",
           refresh_name: str = "nightly") -> list[str]:
    """Create or update `stage-and-launch/<launch_name>` and `model-refresh/<refresh_name>` (on
    `cron`, UTC) in work pool `pool`. `watchlist`: a YAML file on the worker's machine (default: the
    packaged list). Returns the deployment names."""
    ensure_pool(pool)
    deployments = [
        stage_and_launch.to_deployment(
            launch_name, work_pool_name=pool, tags=["modelferry"], entrypoint_type=EntrypointType.MODULE_PATH,
            job_variables={"env": PROCESS_DEFAULTS},
            description="Stage a model, verify it, launch it where it streams its weights from R2, and time every "
                        "phase."),
        model_refresh.to_deployment(
            refresh_name, work_pool_name=pool, tags=["modelferry"], entrypoint_type=EntrypointType.MODULE_PATH,
            job_variables={"env": PROCESS_DEFAULTS},
            parameters={"watchlist": watchlist} if watchlist else None,
            schedules=[Cron(cron, timezone="UTC")] if cron else None,
            description="Re-stage the watched models when their branch moves."),
    ]
    for d in deployments:
        d.apply(work_pool_name=pool)
    return [f"{d.flow_name}/{d.name}" for d in deployments]
