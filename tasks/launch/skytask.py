"""The SkyPilot task we generate for one model: the template in deployments/ filled from the manifest
and the launch options, GPUs chosen to fit the weights and the KV cache. Pure: checking it against
SkyPilot's own schema and launching it are `sky.py`'s job."""

from __future__ import annotations

import copy
import hashlib
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from modelferry.tasks import pins
from modelferry.tasks.launch import fit
from modelferry.tasks.on_node import node
from modelferry.tasks.errors import SettingsError, first_line
from modelferry.tasks.launch.options import GPU_COUNTS, LaunchOptions, parse_accelerators

TEMPLATE = resources.files("modelferry.deployments") / "vllm.yaml"
DEFAULT_GPUS = ["L4", "A10G", "L40S", "A100", "A100-80GB", "H100", "H200"]


@dataclass(frozen=True)
class Fitted:
    """GPUs fitted to a model, and the context its nodes serve."""

    gpus: dict[str, int]
    max_model_len: str  # the task's MAX_MODEL_LEN: "" the model's own, N tokens, or -1 the longest that fits
    note: str | None = None  # what to tell the user before launch


def fit_gpus(weights: int, model: fit.Model | None, requested: dict[str, int] | None = None,
             context: int | None = None) -> Fitted:
    """For each GPU type, the fewest GPUs (1, 2, 4, 8) that hold the weights and the KV cache of
    `context` tokens (None: the model's full context), or the `requested` options checked against it.
    Where no option holds the full context, each node serves the longest that fits (vLLM's
    `--max-model-len -1`) and the note says so. Without the model's config only the weights are
    fitted and vLLM picks the context. A context no option holds is a SettingsError naming
    --max-model-len, raised before anything starts."""
    if model is None:
        return _fit_weights_alone(weights, requested, context)
    if context and context > model.full_context:
        raise SettingsError(f"--max-model-len {context:,} is more than the model's own context ({model.full_context:,} "
                            "tokens), which vLLM refuses to exceed: choose at most that")
    weights = weights or model.weight_bytes()  # a Hub model not staged: its files are not listed
    want = context or model.full_context
    shown = f"{want:,}-token context" + ("" if context else " (the model's full context)")
    # vLLM splits the attention heads across tensor-parallel GPUs: a count must divide them
    counts = [n for n in GPU_COUNTS if model.heads % n == 0]
    if requested and (split := [f"{g}:{n}" for g, n in requested.items() if model.heads % n]):
        raise SettingsError(f"{', '.join(split)}: the model's {model.heads} attention heads don't divide across "
                            "that many GPUs (vLLM's tensor parallelism needs them to)")
    held = {(g, n): fit.context_on(model, weights, g, n)
            for g in (requested or DEFAULT_GPUS) for n in ([requested[g]] if requested else counts)}
    if requested:
        short = {f"{g}:{n}": c for (g, n), c in held.items() if c < min(want, fit.MIN_CONTEXT if not context else want)}
        if short:
            raise SettingsError(f"{_holds(short)}, not a {shown}: ask for more or larger GPUs (--accelerators)"
                                f"{' or a shorter --max-model-len' if context else ''}")
        gpus = dict(requested)
    else:
        gpus = {g: next((n for n in counts if held[g, n] >= want), 0) for g in DEFAULT_GPUS}
        gpus = {g: n for g, n in gpus.items() if n}
        if not gpus and context:
            raise SettingsError(f"no GPU option holds the weights and a {shown} ({counts[-1]} x H200 hold about "
                                f"{held['H200', counts[-1]]:,} tokens): choose a shorter --max-model-len")
        if not gpus:
            gpus = {g: next((n for n in counts if held[g, n] >= fit.MIN_CONTEXT), 0) for g in DEFAULT_GPUS}
            gpus = {g: n for g, n in gpus.items() if n}
            if not gpus:
                raise SettingsError(f"the weights and a {fit.MIN_CONTEXT:,}-token context fit no GPU option (up to "
                                    "8 x H200): the model needs multi-node serving")
    short = {f"{g}:{n}": held[g, n] for g, n in gpus.items() if held[g, n] < want}
    if context:
        return Fitted(gpus, str(context))
    if short:
        return Fitted(gpus, "-1", f"{_holds(short)} of the model's {want:,}: each node serves the longest context "
                                  "that fits (vLLM's --max-model-len -1); choose one with --max-model-len")
    return Fitted(gpus, "")


def _holds(contexts: dict[str, int]) -> str:
    return "; ".join(f"{option} holds about {tokens:,} tokens" for option, tokens in contexts.items())


def _fit_weights_alone(weights: int, requested: dict[str, int] | None, context: int | None) -> Fitted:
    """No config.json to read the KV cache from: the weights and a fixed allowance, per GPU."""
    def holds(g: str, n: int) -> bool:  # 1 GiB for activations and some KV cache beside vLLM's allowance
        allowance = (fit.GRAPHS_GIB + fit.WORKSPACE_GIB + 1) * GIB
        return fit.usable_bytes(g) >= weights / n + allowance

    if requested:
        small = [f"{g}:{n}" for g, n in requested.items() if not holds(g, n)]
        if small:
            raise SettingsError(f"{', '.join(small)} cannot hold the weights ({weights / GIB:.1f} GiB): ask for more or "
                                "larger GPUs")
        gpus = dict(requested)
    else:
        gpus = {g: n for g in DEFAULT_GPUS if (n := next((n for n in GPU_COUNTS if holds(g, n)), 0))}
        if not gpus:
            raise SettingsError(f"the weights ({weights / GIB:.0f} GiB) fit no GPU option (up to 8 x H200): the model "
                                "needs multi-node serving")
    return Fitted(gpus, str(context) if context else "-1",
                  None if context else "the model's config.json was not read: GPUs fitted to the weights alone, and "
                                       "each node serves the longest context that fits (vLLM's --max-model-len -1)")


def fit_local(model: fit.Model | None, kv_cache_bytes: int, context: int | None = None) -> Fitted:
    """The local node: a CPU node whose KV cache is fixed (`kv_cache_bytes`), through the same rule
    as a GPU. vLLM's CPU blocks hold 128 tokens (platforms/cpu.py 294)."""
    if model is None:
        return Fitted({}, str(context) if context else "-1")
    held = fit.context_fitting(model, kv_cache_bytes, 1, block=128)
    want = context or model.full_context
    if held < want and context:
        raise SettingsError(f"the local node's KV cache ({kv_cache_bytes / GIB:g} GiB) holds about {held:,} tokens, "
                            f"not --max-model-len {context:,}: choose a shorter --max-model-len")
    if held < want:
        return Fitted({}, "-1", f"the local node holds about {held:,} tokens of the model's {want:,}: it serves the "
                                "longest context that fits (vLLM's --max-model-len -1); choose one with --max-model-len")
    return Fitted({}, str(context) if context else "")


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


def cluster_name(model: str, revision: str, run_id: str) -> str:
    """Deterministic cluster/service name for one run: a Prefect retry reuses it, never a second one."""
    slug = re.sub(r"[^a-z0-9-]+", "-", model.split("/")[-1].lower()).strip("-")[:24]
    return f"mf-{slug}-{hashlib.sha1(f'{model}@{revision}#{run_id}'.encode()).hexdigest()[:8]}"


def packaged_file(path: str) -> str:
    """A template's file-mount source, written as its path in the repo (`tasks/on_node/compile_cache.py`),
    as the file of the installed package."""
    folder, _, name = path.partition("/")
    return str(resources.files(f"modelferry.{folder}") / name)


def build_task_config(*, model_uri: str, served_name: str, model_bytes: int, weights: str, options: LaunchOptions,
                      loader_env: dict[str, str], revision: str = "", bucket: str = "",
                      weight_files: tuple[int, ...] = (), fitted: Fitted | None = None, template: Path = TEMPLATE) -> dict:
    """The SkyPilot task as a YAML-ready dict, for weights read from `weights` ("r2": the bucket, as
    `options.strategy` says; "hub": the Hub) of `model_bytes` in all, the sizes of the safetensors
    files the streamer reads `weight_files` (none: the node's memory alone sizes its buffer), on the
    GPUs and with the context `fitted` chose (None: fitted to the weights alone, `fit_gpus`).
    Secrets are null (supplied at launch)."""
    options.check()
    if fitted is None:
        fitted = fit_gpus(model_bytes, None, parse_accelerators(options.accelerators) if options.accelerators else None,
                          options.max_model_len)
    cfg = yaml.safe_load(template.read_text())
    envs = cfg["envs"]
    envs.update(MODEL_URI=model_uri, SERVED_MODEL_NAME=served_name, MODEL_REVISION=revision,
                LOAD_STRATEGY=options.strategy if weights == "r2" else "hub",
                LOADER_CONCURRENCY=str(options.concurrency or "auto"),
                LOADER_MEMORY_LIMIT="auto" if options.memory_limit is None else str(options.memory_limit),
                LOADER_WEIGHTS_BYTES=str(sum(weight_files)) if weight_files else "",
                LOADER_LARGEST_FILE=str(max(weight_files)) if weight_files else "",
                EXTRA_VLLM_ARGS=options.extra_vllm_args, COMPILE_CACHE="on" if options.compile_cache else "off",
                COMPILE_CACHE_BUCKET=bucket, READY_TIMEOUT=f"{options.ready_timeout:g}",
                MAX_MODEL_LEN=fitted.max_model_len,
                IDLE_MINUTES=str(options.idle_minutes) if options.mode == "cluster" else "",
                STREAMER_VERSION=pins.STREAMER, S5CMD_VERSION=pins.S5CMD)
    cfg["file_mounts"] = {dst: packaged_file(src) for dst, src in cfg.get("file_mounts", {}).items()}
    envs.update({k: v for k, v in loader_env.items() if k in envs})
    res = cfg["resources"]
    gpus = fitted.gpus or fit_gpus(model_bytes, None).gpus  # the local node's fit names no GPU
    # Per option: eight GPUs run nine vLLM processes on their host, one GPU two. Unset, SkyPilot may
    # pick the smallest host that carries the GPU (16 GiB for an L4).
    res["any_of"] = [{"accelerators": {g: n}, "memory": options.memory or host_memory_ask(model_bytes, n)}
                     for g, n in gpus.items()]
    res["use_spot"] = options.use_spot
    res["disk_size"] = options.disk_size or max(res.get("disk_size", 256), int(model_bytes * 2.5 / 1e9) + 64)
    image = options.vllm_image or pins.VLLM_IMAGE
    res["image_id"] = image if image.startswith("docker:") else f"docker:{image}"
    if weights != "hub":
        cfg["secrets"].pop("HF_TOKEN", None)
    if options.mode == "job":
        # Preemption is always recovered; max_restarts_on_errors only counts the job's own non-zero
        # exits on a cluster still UP (SkyPilot 0.14.1 sky/jobs/controller.py, "Cluster is UP" ->
        # executor.should_restart_on_failure in sky/jobs/recovery_strategy.py). vLLM refusing its
        # model or its options fails the same way on every node: 0 ends the job on the first one.
        res["job_recovery"] = {"strategy": "EAGER_NEXT_REGION", "max_restarts_on_errors": 0}
    if options.mode == "serve":
        # One replica. With on-demand fallback SkyServe launches an on-demand replica for every spot
        # one not yet ready (sky/serve/autoscalers.py 1055-1072): each cold start would pay for two
        # nodes. The probe gives the replica as long to start as --ready-timeout.
        cfg["service"] = {
            "readiness_probe": {"path": "/health", "initial_delay_seconds": math.ceil(options.ready_timeout)},
            "replica_policy": {"min_replicas": 1, "max_replicas": 1,
                               "dynamic_ondemand_fallback": options.ondemand_fallback},
        }
    return cfg


def node_command(cfg: dict) -> str:
    """The `vllm serve` the node program will run for this task, as the dry run shows it: what the
    node decides (the streamer's settings, the GPU count) shown as such."""
    import json
    import shlex

    sized = {"sized": "on the node"}
    env = {**{k: str(v) for k, v in cfg["envs"].items()}, "SKYPILOT_NUM_GPUS_PER_NODE": "GPUS"}
    line = shlex.join(node.vllm_command(env, sized))
    return line.replace(shlex.quote(json.dumps(sized)), "'<sized on the node>'").replace(
        "--tensor-parallel-size GPUS", "--tensor-parallel-size <GPUs of the node>")


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


