"""SkyPilot's SDK, for the task `skytask.py` builds: check it against SkyPilot's own schema, launch it
(cluster, managed job or SkyServe), read its job's state and log, find its endpoint, and take it down.

This is the cloud boundary, kept thin and exercised against SkyPilot's local API server, where it
fails at provisioning (there is no cloud here).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import sys

from modelferry.tasks.errors import LaunchError, SettingsError, first_line

log = logging.getLogger("modelferry.sky")

PORT = 8000  # where the template's vLLM listens
# A cluster's node program stops vLLM once it has served no request for --idle-minutes, and its job
# ends; SkyPilot's autostop then takes the cluster down after this many minutes with no job running.
# Its skylet checks once a minute (sky/skylet/events.py StopEvent, EVENT_INTERVAL_SECONDS = 60) and
# by default also waits for SSH sessions (autostop_lib.py 137, JOBS_AND_SSH): a user logged in keeps it.
AUTOSTOP_MINUTES = 1


def autostop() -> dict:
    """What `sky.launch` is given for a cluster: down (not stop) once it has run no job for
    AUTOSTOP_MINUTES; `wait_for` left to SkyPilot's default."""
    return {"idle_minutes_to_autostop": AUTOSTOP_MINUTES, "down": True}


def _sky():
    """Import SkyPilot with its console log handlers on stderr (they hold stdout from import on)."""
    import logging as _logging

    import sky

    for handler in _logging.getLogger("sky").handlers:
        if isinstance(handler, _logging.StreamHandler) and getattr(handler, "stream", None) is sys.stdout:
            handler.setStream(sys.stderr)
    return sky


def validate(cfg: dict, secrets: dict[str, str] | None = None):
    """Validate with SkyPilot's own schema (offline). Returns the sky.Task, with `secrets` filled in
    the way `sky launch --secret NAME=value` does (a null secret is a reference resolved at launch)."""
    sky = _sky()
    from sky import exceptions

    overrides = [(k, v) for k, v in (secrets or {}).items() if v and k in cfg.get("secrets", {})]
    try:
        return sky.Task.from_yaml_config(copy.deepcopy(cfg), secrets_overrides=overrides)  # it empties its dict
    except (exceptions.InvalidSkyPilotConfigError, ValueError) as exc:
        raise SettingsError(f"SkyPilot rejected the generated task: {first_line(exc)}") from exc


# --- the cloud boundary --------------------------------------------------------------------------

def launch(cfg: dict, name: str, mode: str, secrets: dict[str, str]) -> int | None:
    """Launch on SkyPilot. Blocks until SkyPilot has submitted the run (cluster/job) or the service.
    Returns the cluster job's id (cluster mode), whose log and state the launcher reads.
    SkyPilot's progress goes to stderr, so `--json` output on stdout stays clean."""
    sky = _sky()
    from sky import exceptions

    task = validate(cfg, secrets)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            if mode == "cluster":
                request = sky.launch(task, cluster_name=name, **autostop())
            elif mode == "job":
                request = sky.jobs.launch(task, name=name)
            else:
                request = sky.serve.up(task, service_name=name)
            result = sky.stream_and_get(request, output_stream=sys.stderr)
    except Exception as exc:
        _refused(exc, name, exceptions)
    return result[0] if mode == "cluster" and isinstance(result, tuple) else None


def _refused(exc: Exception, name: str, exceptions) -> None:
    if not type(exc).__module__.startswith("sky"):
        raise exc
    first = first_line(exc) if str(exc).strip() else ""
    hint = " (no cloud reachable: run `sky check`)" if isinstance(exc, exceptions.CloudError) else ""
    raise LaunchError(f"SkyPilot could not launch {name}: {type(exc).__name__}: {first[:300]}{hint}") from exc


def rerun(cfg: dict, name: str, secrets: dict[str, str], job_id: int) -> int:
    """A warm restart on the same cluster: cancel the serving job (it holds the GPUs; a new job would
    queue behind it), then run the task's `run` again. `sky exec` skips setup and file mounts: the
    node keeps its disk, its prefetched weights and its caches. Returns the new job's id."""
    sky = _sky()
    from sky import exceptions

    task = validate(cfg, secrets)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            sky.get(sky.cancel(name, job_ids=[job_id]))
            new_id, _ = sky.stream_and_get(sky.exec(task, cluster_name=name), output_stream=sys.stderr)[:2]
    except Exception as exc:
        _refused(exc, name, exceptions)
    return new_id


def job_state(name: str, job_id: int) -> str:
    """The job's state in SkyPilot's words (RUNNING, FAILED, ...); MISSING when the cluster has no such job."""
    sky = _sky()
    status = sky.get(sky.job_status(name, [job_id])).get(job_id)
    return status.value if status is not None else "MISSING"


def job_log(name: str, job_id: int) -> str:
    """The job's log so far (setup and run output, vLLM's lines), fetched once without following."""
    sky = _sky()
    out = io.StringIO()
    sky.tail_logs(name, job_id, follow=False, output_stream=out)
    return out.getvalue()


def endpoint(name: str, mode: str) -> str | None:
    """The server's base URL, or None while it has none."""
    sky = _sky()
    from sky import exceptions

    try:
        if mode == "serve":
            services = sky.get(sky.serve.status([name]))
            return services[0].get("endpoint") if services else None
        if mode == "cluster":
            ports = sky.get(sky.endpoints(name, PORT))
            url = ports.get(PORT) or ports.get(str(PORT))
            return url if not url or url.startswith("http") else f"http://{url}"
    except (exceptions.ClusterNotUpError, exceptions.ClusterDoesNotExist, ValueError):
        return None
    return None  # managed jobs expose no endpoint


def down(name: str, mode: str) -> bool:
    """Take down what `launch` started under `name`. True if something was taken down."""
    sky = _sky()
    from sky import exceptions

    try:
        if mode == "cluster":
            sky.get(sky.down(name))
        elif mode == "job":
            sky.get(sky.jobs.cancel(name=name))
        else:
            sky.get(sky.serve.down(name))
        return True
    except (exceptions.ClusterDoesNotExist, ValueError, RuntimeError) as exc:
        log.info("nothing to take down for %s: %s", name, first_line(exc))
        return False


def placement(name: str) -> dict:
    """Where the cluster `name` runs, as SkyPilot reports it (`sky status`: the handle's launched
    resources): GPU type and count, instance type, cloud, region, spot. Empty when it has no handle."""
    sky = _sky()
    records = sky.get(sky.status([name]))
    handle = records[0]["handle"] if records else None
    res = getattr(handle, "launched_resources", None)
    return {**_launched(res), "spot": res.use_spot} if res is not None else {}


def _launched(res) -> dict:
    """GPU type and count, instance type, cloud and region of a handle's launched resources."""
    (gpu, count), = (res.accelerators or {None: 0}).items()
    return {"gpu": gpu, "gpus": count, "instance_type": res.instance_type,
            "cloud": str(res.cloud).lower() if res.cloud else None, "region": res.region}


def serving_replicas(name: str) -> dict:
    """Where a service's READY replicas run (`sky serve status`: each replica's `is_spot` and its
    handle's launched resources, sky/serve/replica_managers.py ReplicaInfo.to_info_dict): `spot` is
    True or False when every ready replica agrees, else None (the load balancer may send a request to
    either)."""
    sky = _sky()
    services = sky.get(sky.serve.status([name]))
    return replica_placement(services[0].get("replica_info", []) if services else [])


def replica_placement(replicas: list[dict]) -> dict:
    ready = [r for r in replicas if str(getattr(r.get("status"), "value", r.get("status"))) == "READY"]
    spots = {bool(r.get("is_spot")) for r in ready}
    placed = {"spot": spots.pop() if len(spots) == 1 else None, "replicas": len(ready)}
    res = getattr(ready[0].get("handle"), "launched_resources", None) if len(ready) == 1 else None
    return {**placed, **_launched(res)} if res is not None else placed


def hourly_price(instance_type: str, cloud: str, region: str | None, spot: bool) -> tuple[float | None, str]:
    """The instance's price per hour from SkyPilot's catalog (sky/catalog get_hourly_cost: the
    cheapest zone of the region), and where it came from; None and why when the catalog lacks it or
    can't be read (SkyPilot downloads it on first use)."""
    _sky()
    from sky import catalog

    what = f"{cloud} {instance_type} {'spot' if spot else 'on-demand'}{f' in {region}' if region else ''}"
    try:
        price = catalog.get_hourly_cost(instance_type, spot, region, None, clouds=cloud)
    except Exception as exc:  # noqa: BLE001 - not in the catalog (ValueError), or no catalog to read
        return None, f"{what} not priced by SkyPilot's catalog ({first_line(exc)[:120]}): give --gpu-price USD_PER_HOUR"
    return float(price), f"SkyPilot's catalog, {what}"


def clusters() -> list[str]:
    sky = _sky()
    return [c["name"] for c in sky.get(sky.status())]
