"""The two places a deployment runs, behind one interface: SkyPilot's GPUs and the local node.

Each target starts the generated task (setup, then run), restarts its `run` on the same node for a
warm run, reports the serving job's state and log in SkyPilot's words, finds the server's URL, and
takes it all down. The launcher only ever talks to a `Target`; nothing else asks which one it is.
"""

from __future__ import annotations

import json
import os
import secrets as pysecrets
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from modelferry.tasks import local_target, sky
from modelferry.tasks.errors import SettingsError
from modelferry.tasks.processes import free_port

if TYPE_CHECKING:
    from modelferry.tasks.launcher import Deployment

log = logging.getLogger("modelferry.launch")


class Target(Protocol):
    name: str
    poll_s: float  # how often to ask for the job's state while waiting
    serves_hub: bool  # can its node load weights from the Hub?
    peak_wait_s: float  # how long a measurement waits for the node's peak memory line after /health
    kv_cache_bytes: int | None  # a node whose KV cache is fixed (None: a GPU's, fitted to the weights)

    def api_key(self) -> str: ...
    def start(self, dep: Deployment) -> None: ...
    def restart(self, dep: Deployment) -> None: ...
    def state(self, dep: Deployment) -> str | None: ...
    def log(self, dep: Deployment) -> str: ...
    def url(self, dep: Deployment) -> str | None: ...
    def where(self, dep: Deployment) -> dict: ...
    def teardown(self, dep: Deployment) -> None: ...
    def down(self, name: str | None, everything: bool) -> list[str]: ...


def state_dir() -> Path:
    """Where local nodes live, with a record of each for `modelferry down` (pid and URL only: no keys)."""
    from modelferry.tasks.plan import cache_root

    return cache_root() / "launches"


class Local:
    """One node on this machine running the task's own scripts with real vLLM (`local_target`)."""

    name, poll_s, serves_hub, peak_wait_s = "local", 0.2, False, 5.0
    # vLLM's CPU backend takes this many GiB for its KV cache, whatever the model needs (platforms/cpu.py
    # 323-327): the local node's accelerator memory, for the same fit as a GPU's.
    kv_cache_bytes = int(local_target.CPU_SETTINGS["VLLM_CPU_KVCACHE_SPACE"]) * 2**30

    def api_key(self) -> str:
        return os.environ.get("VLLM_API_KEY") or pysecrets.token_urlsafe(24)

    def start(self, dep: Deployment) -> None:
        if dep.node is None:
            dep.node = local_target.make_node(dep.cfg, dep.secrets, state_dir() / dep.cluster, free_port())
        local_target.submit(dep.node, dep.cfg, with_setup=True, kept=dep.kept)
        dep.url = dep.node.url
        self._record(dep)

    def restart(self, dep: Deployment) -> None:
        local_target.stop_job(dep.node)
        local_target.submit(dep.node, dep.cfg, with_setup=False, kept=dep.kept)
        self._record(dep)

    def state(self, dep: Deployment) -> str | None:
        return local_target.state(dep.node)

    def log(self, dep: Deployment) -> str:
        path = dep.node.log if dep.node else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    def url(self, dep: Deployment) -> str | None:
        return dep.node.url if dep.node else None

    def where(self, dep: Deployment) -> dict:
        return {"gpu": "cpu", "gpus": 0, "instance_type": "local", "cloud": "local", "region": "local", "spot": False}

    def teardown(self, dep: Deployment) -> None:
        if dep.node:
            local_target.stop_job(dep.node)
            local_target.remove(dep.node)  # the job logs are kept with the results

    def down(self, name: str | None, everything: bool) -> list[str]:
        taken = []
        for rec_file in sorted(state_dir().glob("*.json")) if state_dir().exists() else []:
            rec = json.loads(rec_file.read_text())
            if everything or name in (rec["cluster"], rec["model"]):
                if rec.get("pid"):
                    local_target.stop_runner(rec["pid"])
                local_target.remove(local_target.LocalNode(state_dir() / rec["cluster"], {}))
                taken.append(rec["cluster"])
        return taken

    @staticmethod
    def _record(dep: Deployment) -> None:
        dep.node.record.write_text(json.dumps(
            {"cluster": dep.cluster, "model": dep.model, "target": dep.target, "mode": dep.options.mode, "url": dep.url,
             "pid": dep.node.proc.pid if dep.node.proc else None}))


class Sky:
    """SkyPilot: a cluster, a managed job or a service, through its SDK (`sky`)."""

    name, poll_s, serves_hub, peak_wait_s = "sky", 5.0, True, 0.0
    kv_cache_bytes = None

    def api_key(self) -> str:
        key = os.environ.get("VLLM_API_KEY")
        if not key:  # a cloud endpoint is public: its key is the user's to choose and to hand to clients
            raise SettingsError("VLLM_API_KEY is not set: choose the API key clients will use for this server")
        return key

    def start(self, dep: Deployment) -> None:
        dep.job_id = sky.launch(dep.cfg, dep.cluster, dep.options.mode, dep.secrets)
        dep.url = sky.endpoint(dep.cluster, dep.options.mode)

    def restart(self, dep: Deployment) -> None:
        if dep.options.mode != "cluster" or dep.job_id is None:
            raise SettingsError(f"warm runs restart a cluster's serving job; --mode {dep.options.mode} has none: "
                                "use --runs 1")
        dep.job_id = sky.rerun(dep.cfg, dep.cluster, dep.secrets, dep.job_id)

    def state(self, dep: Deployment) -> str | None:
        return sky.job_state(dep.cluster, dep.job_id) if dep.job_id is not None else None  # serve: no job to watch

    def log(self, dep: Deployment) -> str:
        return sky.job_log(dep.cluster, dep.job_id) if dep.job_id is not None else ""

    def url(self, dep: Deployment) -> str | None:
        return dep.url or sky.endpoint(dep.cluster, dep.options.mode)

    def where(self, dep: Deployment) -> dict:
        if dep.options.mode == "job":  # a managed job's nodes are its controller's to name
            return {"spot": dep.options.use_spot}
        try:
            if dep.options.mode == "serve":  # the replicas that answered, as SkyServe reports them
                return sky.serving_replicas(dep.cluster)
            return sky.placement(dep.cluster)
        except Exception as exc:  # noqa: BLE001 - the row is still worth having without it
            log.warning("could not ask SkyPilot where %s runs: %s", dep.cluster, exc)
            return {}

    def teardown(self, dep: Deployment) -> None:
        sky.down(dep.cluster, dep.options.mode)

    def down(self, name: str | None, everything: bool) -> list[str]:
        if not (everything or (name and name.startswith("mf-"))):
            return []
        try:
            names = [c for c in sky.clusters() if c.startswith("mf-") and (everything or c == name)]
        except Exception as exc:  # noqa: BLE001 - SkyPilot unreachable: say so, keep the local result
            log.warning("could not ask SkyPilot for clusters: %s", exc)
            return []
        return [c for c in names if sky.down(c, "cluster")]


TARGETS: dict[str, Target] = {"local": Local(), "sky": Sky()}
