"""Every `modelferry` command: its flags (a dataclass, see `flags.py`), its help, and what it does,
side by side; `COMMANDS` is the one list of them, in the order `--help` shows. A command prints
nothing: it returns an `Output` (the data `--json` prints, and how to show it as text), or raises a
typed error; `cli.main` prints either and maps it to the exit code. Commands that run no flow
(check-r2, list, verify, cost, gc) don't import Prefect, so they answer in about a second."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import typing
from dataclasses import dataclass, field
from typing import Callable

from modelferry.flows.flags import Flags, flag, positional
from modelferry.tasks import pins
from modelferry.tasks.measure import results
from modelferry.tasks.measure.cost import HUB_MB_S
from modelferry.tasks.errors import ModelferryError, SettingsError, StepFailed, require_extra
from modelferry.tasks.launch.options import BOTH, STRATEGY_HELP, LaunchOptions


@dataclass
class Output:
    """A command's result: `data` for `--json`; as text, `rows` as a table (when set) then `lines`.
    `failure` is an error to report after the output (a stage that failed after some steps ran)."""

    data: object
    rows: list[dict] | None = None
    lines: list[str] = field(default_factory=list)
    failure: ModelferryError | None = None


@dataclass(frozen=True)
class Command:
    """One command: the function that runs it, the flags it takes (its parameter's type) and its help."""

    name: str
    run: Callable[..., Output]
    flags: type
    help: str
    description: str
    examples: tuple[str, ...]
    notes: str = ""

    @property
    def epilog(self) -> str:
        text = ("examples:\n" if len(self.examples) > 1 else "example:\n") + "\n".join("  " + e for e in self.examples)
        return text + ("\n\n" + self.notes if self.notes else "")


COMMANDS: dict[str, Command] = {}


def command(name: str, *, help: str, description: str, examples: tuple[str, ...], notes: str = ""):
    """Add the function below to COMMANDS as `name`; its flags are its parameter's annotated type."""
    def add(run: Callable[..., Output]) -> Callable[..., Output]:
        (flags,) = (hint for key, hint in typing.get_type_hints(run).items() if key != "return")
        COMMANDS[name] = Command(name, run, flags, help, description, examples, notes)
        return run
    return add


def _bucket():
    from modelferry.tasks import settings as config
    from modelferry.tasks.clients.bucket import Bucket

    return Bucket(config.load())


@dataclass(frozen=True, kw_only=True)
class CheckR2Flags(Flags):
    json: bool = flag(False, "print the result as JSON")


@command("check-r2", help="round-trip a probe object through the bucket",
         description="Put, head, get and delete a probe object; print endpoint, bucket and latency. Each kind of "
                     "misconfiguration gets its own message.",
         examples=("modelferry check-r2",))
def check_r2(args: CheckR2Flags) -> Output:
    from modelferry.tasks import settings as config
    from modelferry.tasks.clients.bucket import check_r2 as probe

    result = probe(config.load())
    return Output(result, lines=[f"OK  endpoint {result['endpoint']}  bucket {result['bucket']}",
                                 "    put {put_ms} ms, head {head_ms} ms, get {get_ms} ms, delete {delete_ms} ms"
                                 .format(**result)])


@dataclass(frozen=True, kw_only=True)
class StageFlags(Flags):
    source: str = positional("Hub repo id (org/name) or local directory (an existing path wins)")
    revision: str | None = flag(None, "branch, tag or commit sha on the Hub (default: main)")
    include: list[str] = flag([], "stage only matching files (repeatable)", metavar="GLOB")
    exclude: list[str] = flag([], "skip matching files (repeatable)", metavar="GLOB")
    name: str | None = flag(None, "org/name to stage under (required for a local directory)")
    allow_unloadable: bool = flag(False, "stage even without config.json or safetensors weights (vLLM could not load it)")
    replace: bool = flag(False, "restage a published revision with different include/exclude globs")
    set_current: bool = flag(True, "don't move the model's current pointer to this revision", flag="--no-set-current")
    task_runner: str = flag("thread", "thread: this machine moves every file (default); dask: shard the files over a "
                                      "Dask cluster", choices=("thread", "dask"))
    dask_address: str | None = flag(
        None, "scheduler of an existing Dask cluster, e.g. tcp://10.0.0.5:8786 (default with --task-runner dask: a "
              "local cluster on this machine). Each worker needs the R2_* settings (and HF_TOKEN) in its environment "
              "and must reach the bucket, the Hub and the Prefect API", metavar="ADDR")
    json: bool = flag(False, "print the per-step rows as JSON on stdout (logs on stderr)")


@command("stage", help="copy a model into the bucket, verified, then publish its manifest",
         description="Stage SOURCE (a Hub repo id org/name, or a local checkpoint directory) into "
                     "s3://$R2_BUCKET/models/<org>/<name>/<revision>/ with the Prefect flow `stage-model`: resolve, "
                     "then download, local_verify and upload pipelined per file (a file goes up as soon as its own "
                     "bytes are verified, while the next one downloads), remote_verify, publish. Files already proven "
                     "in the bucket are not sent again, so a re-run resumes and an unchanged model sends 0 bytes. A "
                     "model too big for one machine's disk or NIC can be sharded over a Dask cluster: each worker "
                     "moves its own share of the files.",
         examples=("modelferry stage sentence-transformers/all-MiniLM-L6-v2",
                   "modelferry stage meta-llama/Llama-3.1-8B-Instruct --revision main --exclude 'original/*'",
                   "modelferry stage ./checkpoints/step-1000 --name acme/llama-ft",
                   "modelferry stage deepseek-ai/DeepSeek-V3 --task-runner dask --dask-address tcp://10.0.0.5:8786"),
         notes="Set PREFECT_API_URL to a running Prefect server to skip starting a temporary one; the log says\n"
               "how long orchestration took to start, apart from the work.")
def stage(args: StageFlags) -> Output:
    from modelferry.tasks.clients import orchestration
    from modelferry.tasks.staging import request

    # Everything that can be refused is refused before Prefect starts (seconds) and before any write.
    bucket = _bucket()
    if args.dask_address and args.task_runner != "dask":
        raise SettingsError("--dask-address needs --task-runner dask")
    if args.task_runner == "dask":
        require_extra("prefect_dask", "dask", "--task-runner dask")
    request.check(args.source, args.name, args.include, args.exclude, args.allow_unloadable)
    bucket.probe()
    t0, cpu0 = time.perf_counter(), time.process_time()
    with orchestration.prefect_api(args.verbose) as where:
        from modelferry.flows.stage_model import stage_model
        from modelferry.flows.steps import startup_report

        clock, failure = None, None
        try:
            staged = stage_model(args.source, revision=args.revision, include=args.include, exclude=args.exclude,
                                 name=args.name, allow_unloadable=args.allow_unloadable, replace=args.replace,
                                 set_current=args.set_current, task_runner=args.task_runner,
                                 dask_address=args.dask_address)
            rows, clock = staged.rows, staged.clock
        except StepFailed as exc:
            rows, failure = exc.rows, exc
        logging.getLogger("modelferry").info("stage: %s", startup_report(t0, cpu0, where, clock))
    return Output(rows, rows=rows, failure=failure)


@dataclass(frozen=True, kw_only=True)
class VerifyFlags(Flags):
    model: str = positional("the model's name as staged (org/name)")
    revision: str | None = flag(None, "revision to check (default: the current one)")
    deep: bool = flag(False, "download and re-hash every object")
    json: bool = flag(False, "print the result as JSON")


@command("verify", help="check the bucket against a published manifest",
         description="Compare each object's size and ETag (computed by the bucket) with the manifest, without "
                     "downloading. --deep re-reads every object and re-hashes it. The result is recorded for `list`.",
         examples=("modelferry verify sentence-transformers/all-MiniLM-L6-v2",
                   "modelferry verify acme/llama-ft --revision local-0123abcd --deep"))
def verify(args: VerifyFlags) -> Output:
    from modelferry.tasks.records import catalog
    from modelferry.tasks.errors import IntegrityError

    try:
        record = catalog.verify(_bucket(), args.model, args.revision, args.deep)
    except IntegrityError as exc:
        return Output({"name": args.model, "ok": False, "bad": exc.bad_files, "error": str(exc)}, failure=exc)
    how = "re-hashed" if args.deep else "size + ETag"
    return Output(record, lines=[f"OK  {record['name']}@{record['revision']}: {record['files']} files, "
                                 f"{record['bytes']:,} bytes ({how})"])


@dataclass(frozen=True, kw_only=True)
class ListFlags(Flags):
    json: bool = flag(False, "print rows as JSON")
    compile_caches: bool = flag(False, "list the stored vLLM compile caches (key, files, bytes, saved_at) instead")


@command("list", help="list staged models",
         description="One row per published model revision: its files, bytes, whether it is the current one, and "
                     "its last verification.",
         examples=("modelferry list", "modelferry list --compile-caches --json"))
def list_models(args: ListFlags) -> Output:
    from modelferry.tasks.records import catalog, housekeeping

    if args.compile_caches:
        rows = housekeeping.compile_caches(_bucket())
        return Output(rows, rows=rows)
    rows = catalog.list_models(_bucket())
    shown = ("name", "revision", "current", "files", "bytes", "verified", "staged_at", "uri")
    return Output(rows, rows=[{k: r[k] for k in shown} for r in rows])


@dataclass(frozen=True, kw_only=True)
class LaunchFlags(Flags, LaunchOptions):
    """The launch options (options.py) and what every command that launches adds to them."""

    model: str = positional("the model's name as staged (org/name), or a Hub repo id with --source hub")
    revision: str | None = flag(None, "revision (default: the model's current one)")
    json: bool = flag(False, "print the phase rows as JSON")


@dataclass(frozen=True, kw_only=True)
class BenchFlags(LaunchFlags):
    strategy: str = flag("stream", STRATEGY_HELP + "; both: compare them")
    runs: int = flag(2, "runs per strategy (default 2: one cold, one warm)")
    results: str = flag("results", "results folder (default ./results)")


def _launch_options(args: LaunchFlags) -> LaunchOptions:
    """The launch flags, checked before paying for Prefect's start-up, with the check the flow runs."""
    options = LaunchOptions.pick(vars(args))
    options.check()
    if getattr(args, "runs", 1) < 1:
        raise SettingsError("--runs must be at least 1")
    return options


def _run_flow(args, **params) -> Output:
    from dataclasses import asdict

    from modelferry.tasks.clients import orchestration
    from modelferry.tasks import settings as config

    options = _launch_options(args)
    config.load()
    if options.target == "local":
        from modelferry.tasks.launch.local_target import vllm_python

        vllm_python()  # before paying for Prefect's start-up: says how to get it
    with orchestration.prefect_api(args.verbose):
        from modelferry.flows.stage_and_launch import stage_and_launch

        try:
            launched = stage_and_launch(args.model, revision=args.revision, **asdict(options), **params)
        except StepFailed as exc:
            return Output([], failure=exc)
    lines = []
    if launched.saved:
        lines.append(f"results: {launched.saved['dir']}  plot: {launched.saved['png']}")
        lines += [launched.saved["note"]] if launched.saved.get("note") else []
    return Output(launched.rows, rows=[{k: r[k] for k in results.TABLE} for r in launched.rows] or None, lines=lines)


@dataclass(frozen=True, kw_only=True)
class LaunchOnceFlags(LaunchFlags):
    keep: bool = flag(False, "leave it running (take it down with `modelferry down`)")
    dry_run: bool = flag(False, "print the generated SkyPilot task (secrets redacted) and stop")


@command("launch", help="serve a staged model with vLLM, streaming its weights from the bucket",
         description="Build the SkyPilot task from the model's manifest and deployments/vllm.yaml, launch it, wait for "
                     "/health, /v1/models and one completion, and print the phase timings. Keys travel as SkyPilot "
                     "secrets (set VLLM_API_KEY for --target sky). Torn down afterwards unless --keep.",
         examples=("modelferry launch acme/llama-ft --target sky --accelerators L4:1 --keep",
                   "modelferry launch acme/llama-ft --target sky --mode serve --dry-run",
                   "modelferry launch modelferry/tiny-llama --target local"))
def launch(args: LaunchOnceFlags) -> Output:
    if args.strategy == BOTH:
        raise SettingsError("--strategy both is for `bench`; launch takes stream or prefetch")
    if not args.dry_run:
        return _run_flow(args, stage=False, runs=1, keep=args.keep)
    from modelferry.tasks.launch import launcher, skytask
    from modelferry.tasks import settings as config

    dep = launcher.prepare(config.load(), args.model, args.revision, _launch_options(args), "dry-run")
    command = skytask.node_command(dep.cfg)
    return Output({"cluster": dep.cluster, "model": dep.model, "revision": dep.revision, "weights": dep.weights,
                   "task": skytask.redacted_config(dep.cfg, dep.secrets), "command": command},
                  lines=[f"# {dep.cluster}: {dep.model}@{dep.revision} from {dep.weights}",
                         f"# on the node (tasks/on_node/node.py): {command}", skytask.redacted_yaml(dep.cfg, dep.secrets)])


@command("bench", help="time every phase of cold and warm starts",
         description="Run 1 is cold (new node), later runs restart the server on the same node (warm). Each run's "
                     "phases (provision, setup, boot, weights, engine, first_token) go to its own Parquet file under "
                     "--results and the bucket's bench/ prefix, with a stacked-bar plot.",
         examples=("modelferry bench modelferry/tiny-llama --runs 3 --strategy both",
                   "modelferry bench acme/llama-ft --target sky --accelerators H100:1 --runs 2"))
def bench(args: BenchFlags) -> Output:
    return _run_flow(args, stage=False, runs=args.runs, results_dir=args.results)


@dataclass(frozen=True, kw_only=True)
class StageAndLaunchFlags(BenchFlags):
    model: str = positional("the model's name as staged (org/name), or a Hub repo id with --source hub; with "
                            "--name, a local checkpoint directory")
    name: str | None = flag(None, "stage MODEL (a local checkpoint directory on this machine) under the name "
                                  "ORG/NAME, as `stage DIR --name` does, and launch that", metavar="ORG/NAME")
    runs: int = flag(1, "runs per strategy (default 1)")
    include: list[str] = flag([], "stage only matching files (repeatable)", metavar="GLOB")
    exclude: list[str] = flag([], "skip matching files (repeatable)", metavar="GLOB")
    keep: bool = flag(False, "leave the deployment running")


@command("stage-and-launch", help="stage, verify, launch and bench in one Prefect flow",
         description="The flow `stage-and-launch`: stage -> verify -> launch -> bench -> teardown.",
         examples=("modelferry stage-and-launch modelferry/tiny-llama --runs 2",
                   "modelferry stage-and-launch ./checkpoints/step-1000 --name acme/llama-ft --target sky"))
def stage_and_launch(args: StageAndLaunchFlags) -> Output:
    return _run_flow(args, stage=True, runs=args.runs, include=args.include, exclude=args.exclude, keep=args.keep,
                     results_dir=args.results, name=args.name)


@dataclass(frozen=True, kw_only=True)
class DownFlags(Flags):
    what: str | None = positional("a deployment's cluster (mf-...), or a model's name: its kept deployments",
                                  default=None, nargs="?", metavar="CLUSTER|MODEL")
    all: bool = flag(False, "everything modelferry launched and kept")
    target: str = flag("all", "where to look (default all; sky starts SkyPilot's local API server if it isn't running)",
                       choices=("local", "sky", "all"))


@command("down", help="take down deployments kept with --keep",
         description="Stops kept local targets and takes down SkyPilot clusters named mf-*.",
         examples=("modelferry down mf-tiny-llama-1a2b3c4d", "modelferry down modelferry/tiny-llama",
                   "modelferry down --all --target local"))
def down(args: DownFlags) -> Output:
    from modelferry.tasks.launch import launcher

    if not args.what and not args.all:
        raise SettingsError("give a deployment's cluster (mf-...) or a model's name, or pass --all")
    taken = launcher.down(args.what, args.all, args.target)
    return Output(taken, lines=["took down: " + (", ".join(taken) if taken else "nothing")])


@dataclass(frozen=True, kw_only=True)
class CostFlags(Flags):
    model: str = positional("the model's name as staged (org/name)")
    revision: str | None = flag(None, "revision (default: the model's current one)")
    launches_per_day: float = flag(None, "cold starts a day, e.g. 24", required=True)
    s3_egress_per_gb: float = flag(0.09, "USD/GB (default 0.09)")
    r2_storage_per_gb_month: float = flag(0.015, "USD (default 0.015)")
    r2_class_b_per_million: float = flag(0.36, "USD (default 0.36)")
    read_request_mib: int = flag(16, "bytes per ranged GET, MiB (default 16)")
    gpu_price: float | None = flag(None, "the GPU node's price per hour (default: SkyPilot's catalog price of the "
                                         "instance the measured starts ran on)", metavar="USD_PER_HOUR")
    hub_mb_s: float = flag(HUB_MB_S, f"the Hub download rate a start from the Hub is estimated at (default "
                                     f"{HUB_MB_S:g}: the 8-12 minutes users report for an 8B model's 16 GB, at 10 "
                                     "minutes)", metavar="MB_S")
    json: bool = flag(False, "print the result as JSON")


@command("cost", help="what cold starts cost: GPU minutes, egress and storage",
         description="Compares pulling the model's real bytes at every launch from the Hub (free, slow) or S3 "
                     "(egress) with keeping it in R2 (storage + read operations, no egress), and the GPU time each "
                     "cold start bills: the model's measured starts (its bench rows in the bucket) against a start "
                     "from the Hub estimated from the model's size. The hourly price is SkyPilot's catalog price of "
                     "the instance the starts ran on, else --gpu-price.",
         examples=("modelferry cost acme/llama-ft --launches-per-day 24",
                   "modelferry cost acme/llama-ft --launches-per-day 24 --gpu-price 0.80 --hub-mb-s 60"))
def cost(args: CostFlags) -> Output:
    """Egress and storage of a month of cold starts, and the GPU time of each: this model's measured
    starts (its bench rows in the bucket) against a start from the Hub, at the node's hourly price."""
    from modelferry.tasks.records import catalog, layout
    from modelferry.tasks.measure import cost as pricing

    bucket = _bucket()
    manifest = catalog.find_manifest(bucket, args.model, args.revision)
    prices = pricing.Prices(s3_egress_per_gb=args.s3_egress_per_gb, r2_storage_per_gb_month=args.r2_storage_per_gb_month,
                            r2_class_b_per_million=args.r2_class_b_per_million)
    try:
        result = pricing.monthly(manifest.total_bytes, args.launches_per_day, prices, args.read_request_mib * 2**20,
                                 files=len(manifest.files))
        measured = pricing.measured_start(_bench_rows(bucket, layout.bench_root(args.model)))
        hub_s = pricing.hub_start_s(manifest.total_bytes, measured, args.hub_mb_s)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    price, price_source = _hourly_price(measured, args.gpu_price)
    month = result["launches_per_month"]
    staged = pricing.start_cost(measured.seconds, price, month) if measured else None
    hub = pricing.start_cost(hub_s, price, month)
    gpu = {"measured": None if measured is None else {**dataclasses.asdict(measured), "where": measured.where()},
           "usd_per_hour": price, "price_source": price_source, "hub_mb_s": args.hub_mb_s,
           "staged": staged, "hub": hub}
    result = {"name": args.model, "revision": manifest.revision, **result, "gpu": gpu}
    lines = [
        f"{args.model}@{manifest.revision[:12]}: {result['gb_per_launch']} GB x {result['launches_per_month']} "
        "launches/month",
        f"  from S3 (egress ${args.s3_egress_per_gb}/GB): ${result['s3_egress_usd']:,.2f}/month",
        f"  from the Hub: ${result['hub_usd']:,.2f}/month in fees (paid in GPU time instead: below)",
        f"  from R2: ${result['r2_usd']:,.2f}/month (storage ${result['r2_storage_usd']}, "
        f"{result['r2_read_ops']:,} reads, no egress)",
        "GPU time of a cold start (the node is billed from its request to its first token):"]
    if measured:
        lines.append(f"  staged: {_minutes(staged)}, the median of {measured.runs} measured cold start"
                     f"{'s' * (measured.runs > 1)} ({measured.strategy}) on {measured.where()}")
    else:
        lines.append(f"  staged: not measured: no bench rows of {args.model} in the bucket; run `modelferry bench "
                     f"{args.model} --target sky` to measure one")
    lines.append(f"  from the Hub: {_minutes(hub)}, estimated: {'the measured start plus ' if measured else ''}"
                 f"{manifest.total_bytes / 1e9:.2f} GB at {args.hub_mb_s:g} MB/s (--hub-mb-s)")
    lines.append(f"  at ${price:g}/hour ({price_source})" if price is not None else f"  no price: {price_source}")
    return Output(result, lines=lines)


def _minutes(start: dict) -> str:
    money = (f" = ${start['usd_per_launch']:.3f} a launch, ${start['usd_per_month']:,.2f}/month"
             if "usd_per_launch" in start else "")
    return f"{start['minutes']:.1f} node-minutes{money}"


def _bench_rows(bucket, prefix: str):
    """Every bench row the bucket holds under `prefix` (each bench writes its rows there)."""
    import io

    import pandas as pd

    frames = [pd.read_parquet(io.BytesIO(bucket.get_bytes(key))) for key in sorted(bucket.listing(prefix))
              if key.endswith(".parquet")]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _hourly_price(measured, gpu_price: float | None) -> tuple[float | None, str]:
    """The node's price per hour and where it came from: --gpu-price, else SkyPilot's catalog for the
    instance the measured starts ran on."""
    if gpu_price is not None:
        if gpu_price <= 0:
            raise SettingsError(f"--gpu-price {gpu_price:g}: give the node's price in USD per hour")
        return gpu_price, "--gpu-price"
    if measured is None or measured.target != "sky" or not (measured.instance_type and measured.cloud):
        return None, "no measured GPU node to look up in SkyPilot's catalog: give --gpu-price USD_PER_HOUR"
    from modelferry.tasks.clients import sky

    return sky.hourly_price(measured.instance_type, measured.cloud, measured.region, bool(measured.spot))


@dataclass(frozen=True, kw_only=True)
class GcFlags(Flags):
    grace_hours: float = flag(24, "leave anything younger alone (default 24)")
    dry_run: bool = flag(False, "say what would go, change nothing")
    compile_cache_days: float | None = flag(None, "also drop compile caches saved more than DAYS ago", metavar="DAYS")
    json: bool = flag(False, "print the result as JSON")


@command("gc", help="clean up what interrupted stages left in the bucket",
         description="Aborts unfinished multipart uploads and removes revision prefixes that never got a manifest (and "
                     "are not locked by a running stage), once older than the grace period. Published revisions are "
                     "never touched. `stage` also aborts its own revision's leftovers when it starts.",
         examples=("modelferry gc --grace-hours 24 --dry-run",))
def gc(args: GcFlags) -> Output:
    from modelferry.tasks.records import housekeeping

    if args.grace_hours < 0:
        raise SettingsError("--grace-hours must be 0 or more")
    bucket = _bucket()
    result = housekeeping.gc(bucket, args.grace_hours * 3600, args.dry_run)
    if args.compile_cache_days is not None:
        result["removed_compile_caches"] = housekeeping.drop_compile_caches(bucket, args.compile_cache_days * 86400,
                                                                            args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    lines = [f"{verb} {len(result['aborted_uploads'])} unfinished multipart upload(s), "
             f"{len(result['removed_revisions'])} unpublished revision(s) ({result['removed_objects']} objects)",
             *(f"  {rev}" for rev in result["removed_revisions"])]
    if "removed_compile_caches" in result:
        lines.append(f"{verb} {len(result['removed_compile_caches'])} compile cache(s)")
    return Output(result, lines=lines)


@command("blocks", help="store the R2/HF settings as Prefect Secret blocks",
         description="Saves each of R2_ENDPOINT, R2_BUCKET, R2_ACCESS_KEY, R2_SECRET_KEY, HF_TOKEN, R2_READ_ACCESS_KEY, "
                     "R2_READ_SECRET_KEY found in the environment as a Secret block (modelferry-r2-endpoint, ...). "
                     "Flows read a block when the variable is not set, so workers need no keys in their environment.",
         examples=("export PREFECT_API_URL=http://127.0.0.1:4200/api", "modelferry blocks"))
def blocks(args: Flags) -> Output:
    from modelferry.tasks import settings as config

    if not os.environ.get("PREFECT_API_URL"):
        raise SettingsError("PREFECT_API_URL is not set: point it at the Prefect server that should hold the blocks")
    saved = config.save_blocks()
    if not saved:
        raise SettingsError("none of the settings are in the environment: nothing to save")
    return Output(saved, lines=["saved Secret blocks: " + ", ".join(saved)])


@dataclass(frozen=True, kw_only=True)
class RefreshFlags(Flags):
    watchlist: str | None = flag(None, "YAML list of models to watch (default: the list packaged with modelferry)",
                                 metavar="PATH")
    json: bool = flag(False, "print one row per model as JSON")


@command("refresh", help="re-stage the watched models whose branch moved (flow model-refresh)",
         description="Runs the flow `model-refresh` once: for each model in the watch list, resolve its branch on the "
                     "Hub; if it moved, stage the new commit (files unchanged since the current revision are copied "
                     "inside the bucket), verify it, make it current and keep the newest `keep` revisions. The "
                     "scheduled deployment runs the same flow.",
         examples=("modelferry refresh", "modelferry refresh --watchlist ./watched-models.yaml"))
def refresh(args: RefreshFlags) -> Output:
    from modelferry.tasks import settings as config

    config.load()
    if args.watchlist and not os.path.isfile(args.watchlist):
        raise SettingsError(f"--watchlist {args.watchlist}: no such file")
    from modelferry.flows.model_refresh import load_watchlist, model_refresh

    if args.watchlist:
        load_watchlist(args.watchlist)  # a malformed list fails here, before Prefect starts
    rows = model_refresh(args.watchlist)
    return Output(rows, rows=rows)


@dataclass(frozen=True, kw_only=True)
class DeployFlags(Flags):
    pool: str = flag("local", "process work pool to deploy to (default local)")
    watchlist: str | None = flag(None, "watch list path on the worker's machine for model-refresh (default: the "
                                       "packaged list)", metavar="PATH")
    cron: str = flag(pins.NIGHTLY, f"model-refresh schedule, UTC (default '{pins.NIGHTLY}'; '' for none)")
    launch_name: str = flag("default", "name of the stage-and-launch deployment")
    refresh_name: str = flag("nightly", "name of the model-refresh deployment")


@command("deploy", help="create the Prefect deployments from the installed package",
         description="Creates (or updates) `stage-and-launch/default` and the scheduled `model-refresh/nightly` on "
                     "the Prefect server at PREFECT_API_URL, in a process work pool (created if missing). Their "
                     "entrypoints are module paths, so a worker needs only `pip install modelferry` and the R2_*/HF_* "
                     "settings (or the Secret blocks from `modelferry blocks`); no checkout. From a checkout, "
                     "prefect.yaml does the same with `prefect deploy --all`.",
         examples=("export PREFECT_API_URL=http://127.0.0.1:4200/api",
                   "modelferry deploy --pool local --watchlist /etc/modelferry/watched-models.yaml",
                   "prefect worker start --pool local",
                   "prefect deployment run stage-and-launch/default -p model=org/name --watch"))
def deploy(args: DeployFlags) -> Output:
    if not os.environ.get("PREFECT_API_URL"):
        raise SettingsError("PREFECT_API_URL is not set: point it at the Prefect server the workers poll")
    from modelferry.flows.deploy import deploy as create

    names = create(args.pool, args.watchlist, args.cron, args.launch_name, args.refresh_name)
    return Output(names, lines=[f"deployed to work pool {args.pool}: " + ", ".join(names),
                                f"start a worker where modelferry is installed:  prefect worker start --pool {args.pool}"])
