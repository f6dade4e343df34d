"""The SkyPilot task we generate for one model: the template in deployments/ filled from the manifest
and the launch options, GPUs chosen to fit the weights, checked offline by SkyPilot's own schema.
Pure but for that schema check; launching it is `sky.py`'s job."""

from __future__ import annotations

import copy
import hashlib
import math
import re
from importlib import resources
from pathlib import Path

import yaml

from modelferry.tasks import node
from modelferry.tasks.errors import SettingsError, first_line
from modelferry.tasks.options import GPU_COUNTS, GPU_MEMORY_GIB, LaunchOptions, parse_accelerators

TEMPLATE = resources.files("modelferry.deployments") / "vllm.yaml"
DEFAULT_GPUS = ["L4", "A10G", "L40S", "A100", "A100-80GB", "H100", "H200"]


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


# Host RAM, in GiB, for the node program's buffer rule (node.py memory_limit: available less
# PROCESS_GIB per vLLM process, halved, at most RING_CAP_GIB and the weights' ring): the ask below is
# the host on which that rule gives a ring of at least `ring_gib`, or the weights' ring where that is
# less (a test runs the rule on a host of exactly the asked size).
GIB = node.GIB
RING_MIN_GIB = 4  # a few buffers of the largest tensor (an 8B model's embedding is about 1 GiB)
SYSTEM_GIB = 2  # the OS, Docker, SkyPilot's Ray and skylet: not in MemAvailable when `run` reads it


def ring_gib(model_bytes: int) -> float:
    """The streamer buffer a host is asked for: the whole model when small, else 4 GiB or 1/16 of
    the weights, whichever is more (an embedding, the largest tensor, is about 1/16 of an 8B model
    and less of bigger ones, so the ring keeps a few buffers' depth), at most the run script's cap;
    and never under the script's floor, so even a tiny model's host gets a real ring, not the
    fallback."""
    weights = model_bytes / GIB
    return max(node.RING_FLOOR_GIB, min(weights, max(RING_MIN_GIB, weights / 16), node.RING_CAP_GIB))


def host_memory_ask(model_bytes: int, gpus: int) -> str:
    """SkyPilot's `memory` for one GPU option: at least the host on which the run script's rule gives
    `ring_gib` and leaves vLLM's processes theirs. 1 GPU and a small model: 12+, fits a 16 GiB host."""
    gib = SYSTEM_GIB + node.PROCESS_GIB * (gpus + 1) + 2 * ring_gib(model_bytes)
    return f"{math.ceil(gib)}+"


def run_name(model: str, revision: str, run_id: str) -> str:
    """Deterministic cluster/service name for one run: a Prefect retry reuses it, never a second one."""
    slug = re.sub(r"[^a-z0-9-]+", "-", model.split("/")[-1].lower()).strip("-")[:24]
    return f"mf-{slug}-{hashlib.sha1(f'{model}@{revision}#{run_id}'.encode()).hexdigest()[:8]}"


def packaged_file(path: str) -> str:
    """A template's file-mount source, written as its path in the repo (`tasks/compile_cache.py`),
    as the file of the installed package."""
    folder, _, name = path.partition("/")
    return str(resources.files(f"modelferry.{folder}") / name)


def build_task_config(*, model_uri: str, served_name: str, model_bytes: int, weights: str, options: LaunchOptions,
                      loader_env: dict[str, str], revision: str = "", bucket: str = "",
                      weight_files: tuple[int, ...] = (), template: Path = TEMPLATE) -> dict:
    """The SkyPilot task as a YAML-ready dict, for weights read from `weights` ("r2": the bucket, as
    `options.strategy` says; "hub": the Hub) of `model_bytes` in all, the sizes of the safetensors
    files the streamer reads `weight_files` (none: the node's memory alone sizes its buffer).
    Secrets are null (supplied at launch)."""
    options.check()
    cfg = yaml.safe_load(template.read_text())
    envs = cfg["envs"]
    envs.update(MODEL_URI=model_uri, SERVED_MODEL_NAME=served_name, MODEL_REVISION=revision,
                LOAD_STRATEGY=options.strategy if weights == "r2" else "hub",
                LOADER_CONCURRENCY=str(options.concurrency or "auto"),
                LOADER_MEMORY_LIMIT="auto" if options.memory_limit is None else str(options.memory_limit),
                LOADER_WEIGHTS_BYTES=str(sum(weight_files)) if weight_files else "",
                LOADER_LARGEST_FILE=str(max(weight_files)) if weight_files else "",
                EXTRA_VLLM_ARGS=options.extra_vllm_args, COMPILE_CACHE="on" if options.compile_cache else "off",
                COMPILE_CACHE_BUCKET=bucket, READY_TIMEOUT=f"{options.ready_timeout:g}")
    cfg["file_mounts"] = {dst: packaged_file(src) for dst, src in cfg.get("file_mounts", {}).items()}
    envs.update({k: v for k, v in loader_env.items() if k in envs})
    res = cfg["resources"]
    gpus = fitting_accelerators(model_bytes, options.headroom,
                                parse_accelerators(options.accelerators) if options.accelerators else None)
    # Per option: eight GPUs run nine vLLM processes on their host, one GPU two. Unset, SkyPilot may
    # pick the smallest host that carries the GPU (16 GiB for an L4).
    res["any_of"] = [{"accelerators": {g: n}, "memory": options.memory or host_memory_ask(model_bytes, n)}
                     for g, n in gpus.items()]
    res["use_spot"] = options.use_spot
    res["disk_size"] = options.disk_size or max(res.get("disk_size", 256), int(model_bytes * 2.5 / 1e9) + 64)
    if options.vllm_image:
        res["image_id"] = options.vllm_image if options.vllm_image.startswith("docker:") else f"docker:{options.vllm_image}"
    if weights != "hub":
        cfg["secrets"].pop("HF_TOKEN", None)
    if options.mode == "job":
        # Preemption is always recovered; max_restarts_on_errors only counts the job's own non-zero
        # exits on a cluster still UP (SkyPilot 0.14.1 sky/jobs/controller.py, "Cluster is UP" ->
        # executor.should_restart_on_failure in sky/jobs/recovery_strategy.py). vLLM refusing its
        # model or its options fails the same way on every node: 0 ends the job on the first one.
        res["job_recovery"] = {"strategy": "EAGER_NEXT_REGION", "max_restarts_on_errors": 0}
    if options.mode == "serve":
        cfg["service"] = {
            "readiness_probe": {"path": "/health", "initial_delay_seconds": 1800},
            "replica_policy": {"min_replicas": 1, "max_replicas": 1, "dynamic_ondemand_fallback": options.use_spot},
        }
    return cfg


def validate(cfg: dict, secrets: dict[str, str] | None = None):
    """Validate with SkyPilot's own schema (offline). Returns the sky.Task, with `secrets` filled in
    the way `sky launch --secret NAME=value` does (a null secret is a reference resolved at launch)."""
    from modelferry.tasks.sky import _sky  # SkyPilot imported only when a task is checked

    sky = _sky()
    from sky import exceptions

    overrides = [(k, v) for k, v in (secrets or {}).items() if v and k in cfg.get("secrets", {})]
    try:
        return sky.Task.from_yaml_config(copy.deepcopy(cfg), secrets_overrides=overrides)  # it empties its dict
    except (exceptions.InvalidSkyPilotConfigError, ValueError) as exc:
        raise SettingsError(f"SkyPilot rejected the generated task: {first_line(exc)}") from exc


def redacted_config(cfg: dict, secrets: dict[str, str] | None = None) -> dict:
    """The task with every secret shown as <redacted> (or null when unset)."""
    shown = copy.deepcopy(cfg)
    shown["secrets"] = {k: ("<redacted>" if (secrets or {}).get(k) else None) for k in cfg.get("secrets", {})}
    return shown


def redacted_yaml(cfg: dict, secrets: dict[str, str] | None = None) -> str:
    """The task as YAML, as a person would write it, with every secret shown as <redacted>."""
    return yaml.dump(redacted_config(cfg, secrets), Dumper=_BlockDumper, sort_keys=False, width=120)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (setup/run scripts) as `|` blocks, as a person would write them."""


def _str(dumper, data):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_BlockDumper.add_representer(str, _str)


