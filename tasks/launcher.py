"""One deployment of a staged model, on SkyPilot or on the local target: plan it from the manifest,
start it, wait until it serves, time the phases, and take it down.

`source`: auto serves from the bucket when the model is staged and its last verification passed,
else from the Hub (and says so); r2 refuses an unstaged model; hub always uses the Hub.
"""

from __future__ import annotations

import json
import logging
import os
import secrets as pysecrets
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from modelferry.tasks import bench, catalog, local_target, sky
from modelferry.tasks.bucket import Bucket
from modelferry.tasks.errors import IntegrityError, NotReady, NotStaged, SettingsError
from modelferry.tasks.settings import Settings, loader_env, loader_secrets, redact
from modelferry.tasks.processes import free_port

log = logging.getLogger("modelferry.launch")


@dataclass
class Deployment:
    name: str  # cluster / service / local node name, deterministic per run
    model: str
    revision: str
    target: str
    source: str  # r2 | hub, as decided
    options: sky.LaunchOptions
    cfg: dict
    secrets: dict[str, str] = field(repr=False)
    url: str | None = None
    kept: bool = False  # left running on purpose (managed jobs: SkyPilot's controller owns them)
    node: local_target.LocalNode | None = None
    job_id: int | None = None  # the serving job on a SkyPilot cluster
    marks: dict[str, float] = field(default_factory=dict)
    vllm_version: str | None = None  # as the server reports it (/version)

    @property
    def api_key(self) -> str:
        return self.secrets["VLLM_API_KEY"]


def state_dir() -> Path:
    from modelferry.tasks.plan import cache_root

    return cache_root() / "launches"


def plan(settings: Settings, model: str, revision: str | None, target: str, source: str, options: sky.LaunchOptions,
         run_id: str) -> Deployment:
    """Decide where the weights come from and build (and schema-check) the SkyPilot task."""
    sky.check_launch(target, source, options)
    bucket = Bucket(settings)
    manifest = None
    try:
        manifest = catalog.find_manifest(bucket, model, revision)
    except NotStaged:
        if source == "r2":
            raise
    # vLLM loads every safetensors file under the prefix: what it will read now must be exactly the
    # manifest (one listing, size + ETag), whatever the last verification record says.
    check = catalog.check_listing(bucket, manifest) if manifest and source != "hub" else None
    problems = check.problems() if check else []
    if problems:
        damage = (f"{model}@{manifest.revision} in bucket {bucket.name} does not match its manifest: "
                  f"{'; '.join(problems)}. Run the `modelferry stage` that made it again: it removes objects not "
                  "in the manifest and re-sends damaged ones")
    if problems and (source == "r2" or target == "local" or manifest.source.get("kind") == "local"):
        raise IntegrityError(damage, [*check.bad, *check.unexpected])  # nothing else to serve it from
    use = "r2" if manifest and not problems and source != "hub" else "hub"
    if use == "hub":
        if manifest and manifest.source.get("kind") == "local":
            raise NotStaged(f"{model} was staged from a local directory and has no Hub repo to fall back to")
        if source == "auto":
            log.warning("%s: serving it from the Hub instead", damage if problems else
                        f"{model} is not staged in bucket {bucket.name}")
        if target == "local":
            raise SettingsError("the local target only loads staged weights: stage the model first or use --source r2")
    rev = manifest.revision if manifest and use == "r2" else (revision or (manifest.revision if manifest else "main"))
    model_uri = bucket.uri(catalog.model_prefix(model, rev)) if use == "r2" else (
        manifest.source.get("repo_id", model) if manifest else model)
    size = manifest.total_bytes if manifest else 0
    cfg = sky.build_task_config(model_uri=model_uri, served_name=model, model_bytes=size, source=use,
                                options=options, loader_env=loader_env(settings.endpoint), bucket=bucket.name,
                                revision=rev)
    sky.validate(cfg)
    secret_values = dict(loader_secrets(settings))  # the weights (r2) and the compile cache read the bucket
    api_key = os.environ.get("VLLM_API_KEY")
    if not api_key:
        if target == "sky":
            raise SettingsError("VLLM_API_KEY is not set: choose the API key clients will use for this server")
        api_key = pysecrets.token_urlsafe(24)
    secret_values["VLLM_API_KEY"] = api_key
    if use == "hub" and settings.hf_token:
        secret_values["HF_TOKEN"] = settings.hf_token
    redact(list(secret_values.values()))
    # A null secret is one SkyPilot must be given at launch: list only those we will give.
    cfg["secrets"] = {k: None for k in cfg["secrets"] if k in secret_values}
    sky.validate(cfg, secret_values)
    return Deployment(sky.run_name(model, rev, run_id), model, rev, target, use, options, cfg, secret_values)


def start(dep: Deployment, workdir: Path | None = None) -> None:
    """Start the deployment: sky launch, or on the local target a fresh node running the task's
    `setup` then `run`."""
    dep.marks = {"request": time.time()}
    if dep.target == "sky":
        dep.job_id = sky.launch(dep.cfg, dep.name, dep.options.mode, dep.secrets, dep.options.idle_minutes)
        dep.url = sky.endpoint(dep.name, dep.options.mode)
        return
    if dep.node is None:
        workdir = workdir or state_dir() / dep.name
        dep.node = local_target.make_node(dep.cfg, dep.secrets, workdir, free_port())
    local_target.submit(dep.node, dep.cfg, with_setup=True)
    dep.url = dep.node.url
    _record(dep)


def restart(dep: Deployment) -> None:
    """Warm run: stop the serving job and run the task's `run` again on the same node (same disk,
    same caches), on either target."""
    if dep.target == "sky" and (dep.options.mode != "cluster" or dep.job_id is None):
        raise SettingsError(f"warm runs restart a cluster's serving job; --mode {dep.options.mode} has none: use --runs 1")
    dep.marks = {"request": time.time()}
    if dep.target == "sky":
        dep.job_id = sky.rerun(dep.cfg, dep.name, dep.secrets, dep.job_id)
        return
    local_target.stop_job(dep.node)
    local_target.submit(dep.node, dep.cfg, with_setup=False)
    _record(dep)


def job_state(dep: Deployment) -> str | None:
    """The serving job's state (SkyPilot's words), or None where there is no job to watch (serve mode)."""
    if dep.node:
        return local_target.state(dep.node)
    return sky.job_state(dep.name, dep.job_id) if dep.job_id is not None else None


def job_log(dep: Deployment) -> str:
    """The serving job's log: the task's marks and vLLM's own lines, from the node or from SkyPilot."""
    if dep.node:
        return dep.node.log.read_text(errors="replace") if dep.node.log and dep.node.log.exists() else ""
    return sky.job_log(dep.name, dep.job_id) if dep.job_id is not None else ""


def _record(dep: Deployment) -> None:
    """Remember a local deployment for `modelferry down` (pid and URL only: no keys)."""
    state_dir().mkdir(parents=True, exist_ok=True)
    (state_dir() / f"{dep.name}.json").write_text(json.dumps(
        {"name": dep.name, "model": dep.model, "target": dep.target, "mode": dep.options.mode, "url": dep.url,
         "pid": dep.node.proc.pid if dep.node and dep.node.proc else None}))


def _http(url: str, key: str | None = None, body: dict | None = None, timeout: float = 10) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


LIVE = {"INIT", "PENDING", "SETTING_UP", "RUNNING"}


def wait_ready(dep: Deployment, timeout: float = 1800, poll: float | None = None) -> None:
    """Poll until /health answers. Each poll also asks for the serving job's state: a job that ended
    ends the wait at once, with vLLM's own error line from the job's log."""
    deadline = time.time() + timeout
    poll = poll or (0.2 if dep.target == "local" else 5)
    while time.time() < deadline:
        state = job_state(dep)
        if state is not None and state not in LIVE:
            text = job_log(dep)
            said = bench.error_line(text) or " | ".join(text.strip().splitlines()[-3:])
            raise NotReady(f"{dep.name}: the vLLM job is {state} before serving: {said}")
        if dep.target == "sky" and not dep.url:
            dep.url = sky.endpoint(dep.name, dep.options.mode)
        if dep.url and _healthy(dep.url):
            dep.marks["ready"] = time.time()
            return
        time.sleep(poll)
    raise NotReady(f"{dep.name} did not answer /health within {timeout:.0f} s")


def _healthy(url: str) -> bool:
    try:
        return _http(url + "/health", timeout=2)[0] == 200
    except OSError:
        return False


def first_token(dep: Deployment) -> str:
    """/v1/models must list the model; then one completion. Returns the completion text."""
    status, body = _http(dep.url + "/v1/models", dep.api_key)
    if status != 200 or dep.model not in body.decode():
        raise NotReady(f"/v1/models answered {status} without {dep.model}")
    status, body = _http(dep.url + "/v1/completions", dep.api_key,
                         {"model": dep.model, "prompt": "Hello", "max_tokens": 8}, timeout=120)
    if status != 200:
        raise NotReady(f"/v1/completions answered {status}: {body[:200]!r}")
    dep.marks["first_token"] = time.time()
    text = json.loads(body)["choices"][0]["text"]
    status, body = _http(dep.url + "/version", dep.api_key)
    dep.vllm_version = json.loads(body).get("version") if status == 200 else None
    return text


def wait_cache_saved(dep: Deployment, timeout: float = 180) -> str | None:
    """With the compile cache on, wait until the node's saver says what it did (it starts once /health
    answers), so a fresh node launched next can restore it. Returns what it said."""
    if not dep.options.compile_cache or (dep.target == "sky" and dep.job_id is None):
        return None
    deadline = time.time() + timeout
    while time.time() < deadline:
        said = bench.parse_vllm_log(job_log(dep)).get("cache_saved")
        if said or job_state(dep) not in LIVE:
            return said
        time.sleep(0.5 if dep.target == "local" else 5)
    log.warning("%s: the compile cache was not saved within %.0f s", dep.name, timeout)
    return None


def measure(dep: Deployment, kind: str, run: int) -> dict:
    """The phase row for the run that just completed, from the controller's marks (request, ready,
    first token) and the serving job's log (the node's marks and vLLM's lines)."""
    logged = bench.parse_vllm_log(job_log(dep))
    marks = {**bench.node_marks(logged), **dep.marks}
    return {"model": dep.model, "revision": dep.revision, "target": dep.target, "source": dep.source,
            "strategy": dep.options.strategy if dep.source == "r2" else "hub", "kind": kind, "run": run,
            **bench.phases(marks), **{k: logged.get(k) for k in ("weights_s", "compile_s", "graph_capture_s",
                                                                  "init_engine_s")},
            "compile_cache": logged.get("compile_cache") or ("on" if dep.options.compile_cache else "off"),
            "cache_saved": logged.get("cache_saved"),
            "vllm": dep.vllm_version,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(dep.marks["request"]))}


def teardown(dep: Deployment) -> None:
    if dep.target == "sky":
        sky.down(dep.name, dep.options.mode)
    elif dep.node:
        local_target.stop_job(dep.node)
        local_target.remove(dep.node)  # the job logs are kept with the results
    (state_dir() / f"{dep.name}.json").unlink(missing_ok=True)


def down(name: str | None, all_: bool, target: str = "all") -> list[str]:
    """Take down kept deployments: local ones we recorded, and SkyPilot clusters named mf-*."""
    import signal

    taken = []
    records = sorted(state_dir().glob("*.json")) if state_dir().exists() and target != "sky" else []
    for rec_file in records:
        rec = json.loads(rec_file.read_text())
        if all_ or rec["name"] == name or rec["model"] == name:
            if rec.get("pid"):
                try:
                    os.killpg(rec["pid"], signal.SIGTERM)
                except ProcessLookupError:
                    pass
            local_target.remove(local_target.LocalNode(state_dir() / rec["name"], {}))
            rec_file.unlink()
            taken.append(rec["name"])
    if target != "local" and (all_ or (name and name.startswith("mf-"))):
        try:
            names = [c for c in sky.clusters() if c.startswith("mf-") and (all_ or c == name)]
        except Exception as exc:  # noqa: BLE001 - SkyPilot unreachable: say so, keep the local result
            log.warning("could not ask SkyPilot for clusters: %s", exc)
            names = []
        for cluster in names:
            if sky.down(cluster, "cluster"):
                taken.append(cluster)
    return taken
