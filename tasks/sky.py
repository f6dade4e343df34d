"""SkyPilot: build the vLLM task from a staged model's manifest and a template in deployments/,
launch it (cluster, managed job or SkyServe), find its endpoint, and take it down.

Building the task is pure and validated offline by SkyPilot's own schema. Launching needs a cloud:
that boundary is `launch`/`endpoint`/`down` below, kept thin and exercised against SkyPilot's local
API server, where it fails at provisioning (there is no cloud here).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import re
import sys
from importlib import resources
from dataclasses import dataclass
from pathlib import Path

import yaml

from modelferry.tasks.errors import LaunchError, SettingsError, first_line

log = logging.getLogger("modelferry.sky")

TEMPLATE = resources.files("modelferry.deployments") / "vllm.yaml"

# GPU memory (GiB) of the accelerators we offer by default, by SkyPilot's names. SkyPilot itself
# accepts unknown GPU names offline (only its optimizer would catch them), so we check here.
GPU_MEMORY_GIB = {
    "T4": 16, "L4": 24, "A10G": 24, "A10": 24, "L40S": 48, "A100": 40, "A100-80GB": 80,
    "H100": 80, "H200": 141, "B200": 180,
}
DEFAULT_GPUS = ["L4", "A10G", "L40S", "A100", "A100-80GB", "H100", "H200"]
GPU_COUNTS = (1, 2, 4, 8)
MODES = ("cluster", "job", "serve")
STRATEGIES = ("stream", "prefetch")
SOURCES = ("auto", "r2", "hub")
TARGETS = ("sky", "local")
PORT = 8000


@dataclass
class LaunchOptions:
    """How to launch, as the user gave it; every field is a `launch`/`bench` flag and a flow parameter."""

    mode: str = "cluster"
    strategy: str = "stream"
    accelerators: list[str] | None = None  # ["L4:1", "A100:2"]; None: every default GPU that fits
    headroom: float = 1.3  # GPU memory needed = weights x headroom (KV cache, activations, graphs)
    use_spot: bool = True
    concurrency: int = 32
    memory_limit: int = -1
    idle_minutes: int = 30
    disk_size: int | None = None
    image: str | None = None  # --vllm-image: any image with vLLM (default: the template's pinned one)
    extra_args: str = ""
    ready_timeout: float = 1800  # seconds to wait for /health after launch
    compile_cache: bool = True  # carry vLLM's compile caches through the bucket

    def check(self) -> None:
        """Every option on its own; the one place each is checked. Errors name the flag."""
        if self.mode not in MODES:
            raise SettingsError(f"unknown --mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.strategy not in STRATEGIES:
            raise SettingsError(f"unknown --strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if not 1 <= self.concurrency <= 256:
            raise SettingsError(f"--concurrency {self.concurrency} is out of range: use 1-256 (32-64 is typical)")
        if self.memory_limit < -1:
            raise SettingsError("--memory-limit must be -1 (unlimited) or a number of bytes")
        if not 1.0 <= self.headroom <= 10:
            raise SettingsError(f"--headroom {self.headroom} is out of range: use 1.0-10")
        if not 0 < self.ready_timeout <= 6 * 3600:
            raise SettingsError(f"--ready-timeout {self.ready_timeout} is out of range: use 1-21600 seconds")
        if self.idle_minutes < 1:
            raise SettingsError("--idle-minutes must be at least 1")
        if self.disk_size is not None and not 32 <= self.disk_size <= 65536:
            raise SettingsError(f"--disk-size {self.disk_size} is out of range: use 32-65536 GB")
        if self.accelerators:
            parse_accelerators(self.accelerators)


def launch_options(*, mode: str = "cluster", strategy: str = "stream", accelerators: list[str] | None = None,
                   concurrency: int = 32, ready_timeout: float = 1800, compile_cache: bool = True,
                   vllm_image: str | None = None, headroom: float = 1.3, memory_limit: int = -1,
                   idle_minutes: int = 30, use_spot: bool = True, disk_size: int | None = None,
                   extra_vllm_args: str = "", target: str = "", source: str = "") -> LaunchOptions:
    """LaunchOptions from the flags / flow parameters of the same names (target and source, which say
    where rather than how, are ignored here)."""
    return LaunchOptions(mode=mode, strategy=strategy, accelerators=accelerators, headroom=headroom,
                         use_spot=use_spot, concurrency=concurrency, memory_limit=memory_limit,
                         idle_minutes=idle_minutes, disk_size=disk_size, image=vllm_image, extra_args=extra_vllm_args,
                         ready_timeout=ready_timeout, compile_cache=compile_cache)


def check_launch(target: str, source: str, options: LaunchOptions) -> None:
    """Where and from what, with the options: everything about a launch that needs no bucket."""
    if target not in TARGETS:
        raise SettingsError(f"unknown --target {target!r}: choose one of {', '.join(TARGETS)}")
    if source not in SOURCES:
        raise SettingsError(f"unknown --source {source!r}: choose one of {', '.join(SOURCES)}")
    options.check()
    if target == "local" and options.mode != "cluster":
        raise SettingsError(f"--mode {options.mode} needs --target sky: the local target is one node")


def parse_accelerators(specs: list[str]) -> dict[str, int]:
    """["L4:1", "A100"] -> {"L4": 1, "A100": 1}; unknown names are refused with the known list."""
    out = {}
    for spec in specs:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, count = part.partition(":")
            if name not in GPU_MEMORY_GIB:
                raise SettingsError(f"--accelerators: unknown accelerator {name!r}: known are {', '.join(GPU_MEMORY_GIB)}")
            try:
                n = int(count or 1)
            except ValueError:
                raise SettingsError(f"bad accelerator count in {part!r}: use NAME:COUNT, e.g. L4:1") from None
            if n not in GPU_COUNTS:
                raise SettingsError(f"accelerator count {n} in {part!r}: use one of {GPU_COUNTS}")
            out[name] = n
    return out


def fitting_accelerators(model_bytes: int, headroom: float, requested: dict[str, int] | None = None) -> dict[str, int]:
    """For each GPU type, the fewest GPUs (1, 2, 4, 8) whose memory holds weights x headroom."""
    need_gib = model_bytes * headroom / 2**30
    if requested:
        small = [f"{g}:{n}" for g, n in requested.items() if GPU_MEMORY_GIB[g] * n < need_gib]
        if small:
            raise SettingsError(f"{', '.join(small)} cannot hold {need_gib:.1f} GiB (weights x {headroom}): "
                                "ask for more or larger GPUs")
        return dict(requested)
    out = {}
    for gpu in DEFAULT_GPUS:
        n = next((n for n in GPU_COUNTS if GPU_MEMORY_GIB[gpu] * n >= need_gib), None)
        if n:
            out[gpu] = n
    if not out:
        raise SettingsError(f"the model needs {need_gib:.0f} GiB of GPU memory (weights x {headroom}), more than "
                            f"8 x {max(GPU_MEMORY_GIB.values())} GiB: it needs multi-node serving")
    return out


def run_name(model: str, revision: str, run_id: str) -> str:
    """Deterministic cluster/service name for one run: a Prefect retry reuses it, never a second one."""
    slug = re.sub(r"[^a-z0-9-]+", "-", model.split("/")[-1].lower()).strip("-")[:24]
    return f"mf-{slug}-{hashlib.sha1(f'{model}@{revision}#{run_id}'.encode()).hexdigest()[:8]}"


def packaged_file(path: str) -> str:
    """A template's file-mount source, written as its path in the repo (`tasks/compile_cache.py`),
    as the file of the installed package."""
    folder, _, name = path.partition("/")
    return str(resources.files(f"modelferry.{folder}") / name)


def build_task_config(*, model_uri: str, served_name: str, model_bytes: int, source: str, options: LaunchOptions,
                      loader_env: dict[str, str], revision: str = "", bucket: str = "",
                      template: Path = TEMPLATE) -> dict:
    """The SkyPilot task as a YAML-ready dict. Secrets are null (supplied at launch)."""
    options.check()
    cfg = yaml.safe_load(template.read_text())
    envs = cfg["envs"]
    envs.update(MODEL_URI=model_uri, SERVED_MODEL_NAME=served_name, MODEL_REVISION=revision,
                LOAD_STRATEGY=options.strategy if source == "r2" else "hub",
                LOADER_CONCURRENCY=str(options.concurrency), LOADER_MEMORY_LIMIT=str(options.memory_limit),
                EXTRA_VLLM_ARGS=options.extra_args, COMPILE_CACHE="on" if options.compile_cache else "off",
                COMPILE_CACHE_BUCKET=bucket)
    cfg["file_mounts"] = {dst: packaged_file(src) for dst, src in cfg.get("file_mounts", {}).items()}
    envs.update({k: v for k, v in loader_env.items() if k in envs})
    res = cfg["resources"]
    gpus = fitting_accelerators(model_bytes, options.headroom,
                                parse_accelerators(options.accelerators) if options.accelerators else None)
    res["any_of"] = [{"accelerators": {g: n}} for g, n in gpus.items()]
    res["use_spot"] = options.use_spot
    res["disk_size"] = options.disk_size or max(res.get("disk_size", 256), int(model_bytes * 2.5 / 1e9) + 64)
    if options.image:
        res["image_id"] = options.image if options.image.startswith("docker:") else f"docker:{options.image}"
    if source != "hub":
        cfg["secrets"].pop("HF_TOKEN", None)
    if options.mode == "job":
        res["job_recovery"] = {"strategy": "EAGER_NEXT_REGION", "max_restarts_on_errors": 3}
    if options.mode == "serve":
        cfg["service"] = {
            "readiness_probe": {"path": "/health", "initial_delay_seconds": 1800},
            "replica_policy": {"min_replicas": 1, "max_replicas": 1, "dynamic_ondemand_fallback": options.use_spot},
        }
    return cfg


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


def redacted_yaml(cfg: dict, secrets: dict[str, str] | None = None) -> str:
    """The task as YAML with every secret shown as <redacted> (or null when unset)."""
    shown = copy.deepcopy(cfg)
    shown["secrets"] = {k: ("<redacted>" if (secrets or {}).get(k) else None) for k in cfg.get("secrets", {})}
    return yaml.dump(shown, Dumper=_BlockDumper, sort_keys=False, width=120)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (setup/run scripts) as `|` blocks, as a person would write them."""


def _str(dumper, data):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_BlockDumper.add_representer(str, _str)


# --- the cloud boundary --------------------------------------------------------------------------

def launch(cfg: dict, name: str, mode: str, secrets: dict[str, str], idle_minutes: int = 30) -> int | None:
    """Launch on SkyPilot. Blocks until SkyPilot has submitted the run (cluster/job) or the service.
    Returns the cluster job's id (cluster mode), whose log and state the launcher reads.
    SkyPilot's progress goes to stderr, so `--json` output on stdout stays clean."""
    sky = _sky()
    from sky import exceptions

    task = validate(cfg, secrets)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            if mode == "cluster":
                request = sky.launch(task, cluster_name=name, idle_minutes_to_autostop=idle_minutes, down=True)
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


def clusters() -> list[str]:
    sky = _sky()
    return [c["name"] for c in sky.get(sky.status())]
