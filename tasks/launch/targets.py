"""The two places a deployment runs, behind one interface: SkyPilot's GPUs and the local node.

Each target makes a `Handle` for a prepared deployment, which starts the generated task (setup,
then run) and then knows the serving job's state and log in SkyPilot's words, the server's URL,
where it runs, a warm restart of its `run` on the same node, and its teardown. The launcher only
ever talks to a `Target` and the handle it made; nothing else asks which one it is.
"""

from __future__ import annotations

import json
import logging
import os
import secrets as pysecrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from modelferry.tasks.clients import sky
from modelferry.tasks.launch import local_target
from modelferry.tasks.errors import SettingsError
from modelferry.tasks.clients.processes import free_port

if TYPE_CHECKING:
    from modelferry.tasks.launch.launcher import Deployment

log = logging.getLogger("modelferry.launch")


class Handle(Protocol):
    """A deployment as its target knows it, from before it starts: start it, then its serving job
    and server, and its teardown (which works however far the start got)."""

    def start(self) -> None: ...  # the task's `setup`, then `run` (again: on the same node)
    def state(self) -> str | None: ...  # the serving job's state in SkyPilot's words; None: no job to watch
    def log(self) -> str: ...  # the serving job's log: the task's marks and vLLM's lines
    def endpoint(self) -> str | None: ...  # the server's base URL, None while it has none
    def where(self) -> dict: ...  # where it runs, results.PLACEMENT's keys
    def restart(self) -> None: ...  # a warm run: the task's `run` again on the same node
    def stop(self) -> None: ...  # take it down


class Target(Protocol):
    name: str
    poll_s: float  # how often to ask for the job's state while waiting
    serves_hub: bool  # can its node load weights from the Hub?
    peak_wait_s: float  # how long a measurement waits for the node's peak memory line after /health
    kv_cache_bytes: int | None  # a node whose KV cache is fixed (None: a GPU's, fitted to the weights)

    def api_key(self) -> str: ...
    def handle(self, dep: Deployment) -> Handle: ...  # for a prepared deployment; starts nothing
    def down(self, what: str | None, everything: bool) -> list[str]: ...


def state_dir() -> Path:
    """Where local nodes live, with a record of each for `modelferry down` (pid and URL only: no keys)."""
    from modelferry.tasks.staging.plan import cache_root

    return cache_root() / "launches"


@dataclass
class LocalHandle:
    """A node on this machine (`local_target.LocalNode`) and what its record says of it."""

    node: local_target.LocalNode
    cfg: dict = field(repr=False)
    cluster: str
    model: str
    mode: str
    kept: bool

    def start(self) -> None:
        self.submit(with_setup=True)

    def submit(self, with_setup: bool) -> None:
        local_target.submit(self.node, self.cfg, with_setup=with_setup, kept=self.kept)
        self.node.record.write_text(json.dumps(
            {"cluster": self.cluster, "model": self.model, "target": "local", "mode": self.mode, "url": self.node.url,
             "pid": self.node.proc.pid if self.node.proc else None}))

    def state(self) -> str | None:
        return local_target.state(self.node)

    def log(self) -> str:
        path = self.node.log
        return path.read_text(errors="replace") if path and path.exists() else ""

    def endpoint(self) -> str | None:
        return self.node.url

    def where(self) -> dict:
        return {"gpu": "cpu", "gpus": 0, "instance_type": "local", "cloud": "local", "region": "local", "spot": False}

    def restart(self) -> None:
        local_target.stop_job(self.node)
        self.submit(with_setup=False)

    def stop(self) -> None:
        local_target.stop_job(self.node)
        local_target.remove(self.node)  # the job logs are kept with the results


class Local:
    """One node on this machine running the task's own scripts with real vLLM (`local_target`)."""

    # The sampler's last poll can end up to its /health timeout (2 s) plus its 0.5 s sleep after we saw
    # /health, and later on a loaded box: 15 s, only ever spent when the line is late.
    name, poll_s, serves_hub, peak_wait_s = "local", 0.2, False, 15.0
    # vLLM's CPU backend takes this many GiB for its KV cache, whatever the model needs (platforms/cpu.py
    # 323-327): the local node's accelerator memory, for the same fit as a GPU's.
    kv_cache_bytes = int(local_target.CPU_SETTINGS["VLLM_CPU_KVCACHE_SPACE"]) * 2**30

    def api_key(self) -> str:
        return os.environ.get("VLLM_API_KEY") or pysecrets.token_urlsafe(24)

    def handle(self, dep: Deployment) -> LocalHandle:
        return LocalHandle(local_target.make_node(dep.cfg, dep.secrets, state_dir() / dep.cluster, free_port()),
                           dep.cfg, dep.cluster, dep.model, dep.options.mode, dep.kept)

    def down(self, what: str | None, everything: bool) -> list[str]:
        taken = []
        for rec_file in sorted(state_dir().glob("*.json")) if state_dir().exists() else []:
            rec = json.loads(rec_file.read_text())
            if everything or what in (rec["cluster"], rec["model"]):
                if rec.get("pid"):
                    local_target.stop_runner(rec["pid"])
                local_target.remove(local_target.LocalNode(state_dir() / rec["cluster"], {}))
                taken.append(rec["cluster"])
        return taken


@dataclass
class SkyHandle:
    """A cluster's serving job, a managed job or a service, by SkyPilot's name for it."""

    cluster: str
    mode: str
    cfg: dict = field(repr=False)
    secrets: dict[str, str] = field(repr=False)
    use_spot: bool
    job_id: int | None = None  # the serving job on a cluster; None for a managed job or a service
    url: str | None = None

    def start(self) -> None:
        self.job_id = sky.launch(self.cfg, self.cluster, self.mode, self.secrets)
        self.endpoint()

    def state(self) -> str | None:
        return sky.job_state(self.cluster, self.job_id) if self.job_id is not None else None

    def log(self) -> str:
        return sky.job_log(self.cluster, self.job_id) if self.job_id is not None else ""

    def endpoint(self) -> str | None:
        self.url = self.url or sky.endpoint(self.cluster, self.mode)
        return self.url

    def where(self) -> dict:
        if self.mode == "job":  # a managed job's nodes are its controller's to name
            return {"spot": self.use_spot}
        try:
            if self.mode == "serve":  # the replicas that answered, as SkyServe reports them
                return sky.serving_replicas(self.cluster)
            return sky.placement(self.cluster)
        except Exception as exc:  # noqa: BLE001 - the row is still worth having without it
            log.warning("could not ask SkyPilot where %s runs: %s", self.cluster, exc)
            return {}

    def restart(self) -> None:
        if self.mode != "cluster" or self.job_id is None:
            raise SettingsError(f"warm runs restart a cluster's serving job; --mode {self.mode} has none: use --runs 1")
        self.job_id = sky.rerun(self.cfg, self.cluster, self.secrets, self.job_id)

    def stop(self) -> None:
        sky.down(self.cluster, self.mode)


class Sky:
    """SkyPilot: a cluster, a managed job or a service, through its SDK (`sky`)."""

    name, poll_s, serves_hub, peak_wait_s = "sky", 5.0, True, 0.0
    kv_cache_bytes = None

    def api_key(self) -> str:
        key = os.environ.get("VLLM_API_KEY")
        if not key:  # a cloud endpoint is public: its key is the user's to choose and to hand to clients
            raise SettingsError("VLLM_API_KEY is not set: choose the API key clients will use for this server")
        return key

    def handle(self, dep: Deployment) -> SkyHandle:
        return SkyHandle(dep.cluster, dep.options.mode, dep.cfg, dep.secrets, dep.options.use_spot)

    def down(self, what: str | None, everything: bool) -> list[str]:
        if not (everything or (what and what.startswith("mf-"))):
            return []
        try:
            names = [c for c in sky.clusters() if c.startswith("mf-") and (everything or c == what)]
        except Exception as exc:  # noqa: BLE001 - SkyPilot unreachable: say so, keep the local result
            log.warning("could not ask SkyPilot for clusters: %s", exc)
            return []
        return [c for c in names if sky.down(c, "cluster")]


TARGETS: dict[str, Target] = {"local": Local(), "sky": Sky()}
