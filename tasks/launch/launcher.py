"""One deployment of a staged model: decide where its weights come from, build its task, start it
on its target, wait until it serves, time the phases, and take it down.

Where the weights come from (`choose_weights`, pure): `--source auto` serves from the bucket when
the model is staged and what the bucket holds matches its manifest, else from the Hub (and says so);
r2 refuses an unstaged or damaged model; hub always uses the Hub. A node that cannot reach the Hub
(the local target) and a model staged from a local directory have nothing to fall back to.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from modelferry.tasks.clients import sky
from modelferry.tasks.launch import fit, skytask
from modelferry.tasks.measure import startlog
from modelferry.tasks.records import catalog, layout
from modelferry.tasks.clients.bucket import Bucket
from modelferry.tasks.errors import IntegrityError, NotReady, NotStaged, SettingsError
from modelferry.tasks.launch.options import LaunchOptions, parse_accelerators
from modelferry.tasks.measure.results import PLACEMENT, StartRow
from modelferry.tasks.settings import Settings, loader_env, loader_secrets, redact
from modelferry.tasks.launch.targets import TARGETS, Handle, Target

log = logging.getLogger("modelferry.launch")


@dataclass
class Deployment:
    """One run's deployment, held by the flow from before it starts until after its teardown."""

    cluster: str  # SkyPilot's cluster (or service) name, the local node's too: mf-..., deterministic per run
    model: str
    revision: str
    weights: str  # r2 | hub, as decided
    options: LaunchOptions
    cfg: dict
    secrets: dict[str, str] = field(repr=False)
    url: str | None = None
    kept: bool = False  # left running on purpose: --keep, or a managed job (SkyPilot's controller owns it)
    handle: Handle | None = None  # what its target's start returned: None until it started
    marks: dict[str, float] = field(default_factory=dict)
    vllm_version: str | None = None  # as the server reports it (/version)

    @property
    def target(self) -> str:
        return self.options.target

    @property
    def place(self) -> Target:
        return TARGETS[self.options.target]

    @property
    def api_key(self) -> str:
        return self.secrets["VLLM_API_KEY"]


@dataclass(frozen=True)
class Staged:
    """What the bucket holds of a model, as `choose_weights` needs it."""

    model: str
    bucket: str
    revision: str | None = None  # of the published manifest; None: not staged
    from_local_dir: bool = False  # staged from a local directory: there is no Hub repo behind it
    problems: tuple[str, ...] = ()  # where the listing differs from the manifest (empty: intact)
    bad_files: tuple[str, ...] = ()  # the objects those problems name

    def damage(self) -> str:
        return (f"{self.model}@{self.revision} in bucket {self.bucket} does not match its manifest: "
                f"{'; '.join(self.problems)}. Run the `modelferry stage` that made it again: it removes objects "
                "not in the manifest and re-sends damaged ones")


def choose_weights(source: str, serves_hub: bool, staged: Staged) -> tuple[str, str | None]:
    """Where a node loads the weights from: ("r2" | "hub", a warning to log or None). Raises
    IntegrityError, NotStaged or SettingsError when neither will do."""
    problems = staged.problems if source != "hub" else ()  # --source hub: the bucket's state doesn't matter
    if source != "hub" and staged.revision and not problems:
        return "r2", None
    if problems and (source == "r2" or not serves_hub or staged.from_local_dir):
        raise IntegrityError(staged.damage(), list(staged.bad_files))  # nothing else to serve it from
    if source == "r2":
        raise NotStaged(f"{staged.model} is not staged in bucket {staged.bucket}")
    if staged.from_local_dir:
        raise NotStaged(f"{staged.model} was staged from a local directory and has no Hub repo to fall back to")
    if not serves_hub:
        raise SettingsError("the local target only loads staged weights: stage the model first or use --source r2")
    if source == "hub":
        return "hub", None
    return "hub", (staged.damage() if problems else f"{staged.model} is not staged in bucket {staged.bucket}") \
        + ": serving it from the Hub instead"


def prepare(settings: Settings, model: str, revision: str | None, options: LaunchOptions, run_id: str,
            keep: bool = False) -> Deployment:
    """The deployment for one run: where its weights come from, and its SkyPilot task, schema-checked.
    Starts nothing. `keep`: it outlives the command that starts it (`modelferry down` ends it)."""
    options.check()
    place = TARGETS[options.target]
    api_key = place.api_key()  # a missing key fails here, before the bucket is read and SkyPilot imported
    bucket = Bucket(settings)
    manifest = None
    try:
        manifest = catalog.find_manifest(bucket, model, revision)
    except NotStaged:
        if options.source == "r2":
            raise
    # vLLM loads every safetensors file under the prefix: what it will read now must be exactly the
    # manifest (one listing, size + ETag), whatever the last verification record says.
    check = catalog.check_listing(bucket, manifest) if manifest and options.source != "hub" else None
    staged = Staged(model, bucket.name, manifest.revision if manifest else None,
                    from_local_dir=bool(manifest and manifest.source.get("kind") == "local"),
                    problems=tuple(check.problems()) if check else (),
                    bad_files=(*check.bad, *check.unexpected) if check else ())
    weights, warning = choose_weights(options.source, place.serves_hub, staged)
    if warning:
        log.warning("%s", warning)
    rev = manifest.revision if weights == "r2" else (revision or (manifest.revision if manifest else "main"))
    model_uri = bucket.uri(layout.model_prefix(model, rev)) if weights == "r2" else (
        manifest.source.get("repo_id", model) if manifest else model)
    # What the streamer reads: the top folder's safetensors (vLLM's list_safetensors lists no deeper).
    weight_files = tuple(f.size for f in manifest.files if f.path.endswith(".safetensors") and "/" not in f.path) \
        if manifest else ()
    model_bytes = manifest.total_bytes if manifest else 0
    config = model_config(bucket, settings, model, rev, weights, model_uri)
    model_shape = fit.Model.from_config(config) if config else None
    if config and model_shape is None:
        log.warning("%s's config.json does not name its layers, heads and sizes as Llama-style models do: GPUs are "
                    "fitted to the weights alone", model)
    fitted = _fit(place, model_bytes, model_shape, options)
    if fitted.note:
        log.warning("%s", fitted.note)
    cfg = skytask.build_task_config(model_uri=model_uri, served_name=model, model_bytes=model_bytes, weights=weights,
                                    options=options, loader_env=loader_env(settings.endpoint), bucket=bucket.name,
                                    revision=rev, weight_files=weight_files, fitted=fitted)
    sky.validate(cfg)
    secret_values = dict(loader_secrets(settings))  # the weights (r2) and the compile cache read the bucket
    secret_values["VLLM_API_KEY"] = api_key
    if weights == "hub" and settings.hf_token:
        secret_values["HF_TOKEN"] = settings.hf_token
    redact(list(secret_values.values()))
    # A null secret is one SkyPilot must be given at launch: list only those we will give.
    cfg["secrets"] = {k: None for k in cfg["secrets"] if k in secret_values}
    sky.validate(cfg, secret_values)
    return Deployment(skytask.cluster_name(model, rev, run_id), model, rev, weights, options, cfg, secret_values,
                      kept=keep)


def model_config(bucket: Bucket, settings: Settings, model: str, revision: str, weights: str,
                 model_uri: str) -> dict | None:
    """The model's config.json, from where its node reads the weights; None (and a warning) where it
    can't be read: then only the weights are fitted."""
    try:
        if weights == "r2":
            return bucket.get_json(layout.model_prefix(model, revision) + "config.json")
        from modelferry.tasks.clients import hub

        return json.loads(hub.download(model_uri, revision, "config.json", token=settings.hf_token,
                                       endpoint=settings.hf_endpoint).read_text())
    except Exception as exc:  # noqa: BLE001 - the launch still works, fitted to the weights alone
        log.warning("could not read %s's config.json (%s): GPUs are fitted to the weights alone", model, exc)
        return None


def _fit(place: Target, model_bytes: int, model: fit.Model | None, options: LaunchOptions) -> skytask.Fitted:
    """The GPUs and the context this launch asks for: on a GPU, the weights plus the KV cache; on a
    node whose KV cache is fixed (the local target), that cache."""
    if place.kv_cache_bytes is not None:
        return skytask.fit_local(model, place.kv_cache_bytes, options.max_model_len)
    requested = parse_accelerators(options.accelerators) if options.accelerators else None
    return skytask.fit_gpus(model_bytes, model, requested, options.max_model_len)


def start(dep: Deployment) -> None:
    """Start the deployment on its target, timed from now: a fresh node running the task's `setup`,
    then `run` (a retry: the same node again)."""
    dep.marks = {"request": time.time()}
    dep.handle = dep.handle or dep.place.handle(dep)  # held before it starts: a failed start is torn down too
    dep.handle.start()
    dep.url = dep.handle.endpoint()


def restart(dep: Deployment) -> None:
    """Warm run, timed from now: stop the serving job and run the task's `run` again on the same
    node (same disk, same caches)."""
    dep.marks = {"request": time.time()}
    dep.handle.restart()


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
    poll = poll or dep.place.poll_s
    while time.time() < deadline:
        state = dep.handle.state()
        if state is not None and state not in LIVE:
            text = dep.handle.log()
            said = startlog.error_line(text) or " | ".join(startlog.plain_log(text).strip().splitlines()[-3:])
            raise NotReady(f"{dep.cluster}: the vLLM job is {state} before serving: {said}")
        dep.url = dep.url or dep.handle.endpoint()
        if dep.url and _healthy(dep.url):
            dep.marks["ready"] = time.time()
            return
        time.sleep(poll)
    raise NotReady(f"{dep.cluster} did not answer /health within {timeout:.0f} s")


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
    if not dep.options.compile_cache or dep.handle.state() is None:
        return None
    deadline = time.time() + timeout
    while time.time() < deadline:
        said = startlog.parse_vllm_log(dep.handle.log()).get("cache_saved")
        if said or dep.handle.state() not in LIVE:
            return said
        time.sleep(max(0.5, dep.place.poll_s))
    log.warning("%s: the compile cache was not saved within %.0f s", dep.cluster, timeout)
    return None


def _served_log(dep: Deployment) -> dict:
    """The job's log, parsed, once it holds the node's peak host memory line: the run script's
    sampler prints it when it sees /health answer, within its own 0.5 s poll, which may be just
    after we did (a fast restart's first token is quicker). Waited for up to the target's
    `peak_wait_s` (0 on SkyPilot, where each read is an API call and a log read lags the node by
    more than that poll); without a served server (a managed job) read once."""
    logged = startlog.parse_vllm_log(dep.handle.log())
    deadline = time.monotonic() + (dep.place.peak_wait_s if "ready" in dep.marks else 0)
    while "host_peak_gib" not in logged and time.monotonic() < deadline and dep.handle.state() in LIVE:
        time.sleep(0.5)
        logged = startlog.parse_vllm_log(dep.handle.log())
    return logged


def measure(dep: Deployment, kind: str, run: int) -> StartRow:
    """The phase row for the run that just completed, from the controller's marks (request, ready,
    first token) and the serving job's log (the node's marks and vLLM's lines)."""
    logged = _served_log(dep)
    marks = {**startlog.node_marks(logged), **dep.marks}
    where = dep.handle.where()
    return StartRow(model=dep.model, revision=dep.revision, target=dep.target, source=dep.weights,
                    strategy=dep.options.strategy if dep.weights == "r2" else "hub", kind=kind, run=run,
                    **startlog.phases(marks, logged.get("weights_s")), context=logged.get("context"),
                    **{k: logged.get(k) for k in ("compile_s", "graph_capture_s", "init_engine_s", "host_peak_gib")},
                    compile_cache=logged.get("compile_cache") or ("on" if dep.options.compile_cache else "off"),
                    cache_saved=logged.get("cache_saved"), vllm=dep.vllm_version, streamer=logged.get("streamer"),
                    **{k: where.get(k) for k in PLACEMENT},
                    started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(dep.marks["request"])))


def when_it_stops(dep: Deployment) -> str:
    """What ends a kept deployment, as `launch` tells the user."""
    if dep.options.mode == "job":
        return "a managed job: SkyPilot's jobs controller owns it"
    if dep.options.mode == "serve":
        return "a service: it serves until taken down"
    minutes = dep.options.idle_minutes
    gone = "then SkyPilot takes the cluster down" if dep.target == "sky" else "and the node is gone"
    return f"vLLM stops after {minutes} minute{'s' * (minutes > 1)} without a request, {gone}"


def down(name: str | None, everything: bool, target: str = "all") -> list[str]:
    """Take down kept deployments: local nodes we recorded, and SkyPilot clusters named mf-*."""
    return [taken for where, place in TARGETS.items() if target in ("all", where)
            for taken in place.down(name, everything)]
