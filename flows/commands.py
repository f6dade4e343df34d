"""What each `modelferry` command does. A command prints nothing: it returns an `Output` (the data
`--json` prints, and how to show it as text), or raises a typed error; `cli.main` prints either and
maps it to the exit code. Commands that run no flow (check-r2, list, verify, cost, gc) don't import
Prefect, so they answer in about a second."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from modelferry.tasks.errors import ModelferryError, SettingsError, StepFailed, require_extra
from modelferry.tasks import results
from modelferry.tasks.options import BOTH, LaunchOptions



@dataclass
class Output:
    """A command's result: `data` for `--json`; as text, `rows` as a table (when set) then `lines`.
    `failure` is an error to report after the output (a stage that failed after some steps ran)."""

    data: object
    rows: list[dict] | None = None
    lines: list[str] = field(default_factory=list)
    failure: ModelferryError | None = None


def _bucket():
    from modelferry.tasks import settings as config
    from modelferry.tasks.bucket import Bucket

    return Bucket(config.load())


def check_r2(args) -> Output:
    from modelferry.tasks import settings as config
    from modelferry.tasks.bucket import check_r2 as probe

    result = probe(config.load())
    return Output(result, lines=[f"OK  endpoint {result['endpoint']}  bucket {result['bucket']}",
                                 "    put {put_ms} ms, head {head_ms} ms, get {get_ms} ms, delete {delete_ms} ms"
                                 .format(**result)])


def stage(args) -> Output:
    from modelferry.tasks import orchestration, request

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


def verify(args) -> Output:
    from modelferry.tasks import catalog
    from modelferry.tasks.errors import IntegrityError

    try:
        record = catalog.verify(_bucket(), args.model, args.revision, args.deep)
    except IntegrityError as exc:
        return Output({"name": args.model, "ok": False, "bad": exc.bad_files, "error": str(exc)}, failure=exc)
    how = "re-hashed" if args.deep else "size + ETag"
    return Output(record, lines=[f"OK  {record['name']}@{record['revision']}: {record['files']} files, "
                                 f"{record['bytes']:,} bytes ({how})"])


def list_models(args) -> Output:
    from modelferry.tasks import catalog, housekeeping

    if args.compile_caches:
        rows = housekeeping.compile_caches(_bucket())
        return Output(rows, rows=rows)
    rows = catalog.list_models(_bucket())
    shown = ("name", "revision", "current", "files", "bytes", "verified", "staged_at", "uri")
    return Output(rows, rows=[{k: r[k] for k in shown} for r in rows])


def _launch_options(args) -> LaunchOptions:
    """The launch flags, checked before paying for Prefect's start-up, with the check the flow runs."""
    options = LaunchOptions.pick(vars(args))
    options.check()
    if getattr(args, "runs", 1) < 1:
        raise SettingsError("--runs must be at least 1")
    return options


def _run_flow(args, **params) -> Output:
    from dataclasses import asdict

    from modelferry.tasks import orchestration
    from modelferry.tasks import settings as config

    options = _launch_options(args)
    config.load()
    if options.target == "local":
        from modelferry.tasks.local_target import vllm_python

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


def launch(args) -> Output:
    if args.strategy == BOTH:
        raise SettingsError("--strategy both is for `bench`; launch takes stream or prefetch")
    if not args.dry_run:
        return _run_flow(args, stage=False, runs=1, keep=args.keep)
    from modelferry.tasks import launcher, skytask
    from modelferry.tasks import settings as config

    dep = launcher.prepare(config.load(), args.model, args.revision, _launch_options(args), "dry-run")
    command = skytask.node_command(dep.cfg)
    return Output({"cluster": dep.cluster, "model": dep.model, "revision": dep.revision, "weights": dep.weights,
                   "task": skytask.redacted_config(dep.cfg, dep.secrets), "command": command},
                  lines=[f"# {dep.cluster}: {dep.model}@{dep.revision} from {dep.weights}",
                         f"# on the node (tasks/node.py): {command}", skytask.redacted_yaml(dep.cfg, dep.secrets)])


def bench(args) -> Output:
    return _run_flow(args, stage=False, runs=args.runs, results_dir=args.results)


def stage_and_launch(args) -> Output:
    return _run_flow(args, stage=True, runs=args.runs, include=args.include, exclude=args.exclude, keep=args.keep,
                     results_dir=args.results, name=args.name)


def down(args) -> Output:
    from modelferry.tasks import launcher

    if not args.what and not args.all:
        raise SettingsError("give a deployment's cluster (mf-...) or a model's name, or pass --all")
    taken = launcher.down(args.what, args.all, args.target)
    return Output(taken, lines=["took down: " + (", ".join(taken) if taken else "nothing")])


def cost(args) -> Output:
    """Egress and storage of a month of cold starts, and the GPU time of each: this model's measured
    starts (its bench rows in the bucket) against a start from the Hub, at the node's hourly price."""
    from modelferry.tasks import catalog, layout
    from modelferry.tasks import cost as pricing

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
    from modelferry.tasks import sky

    return sky.hourly_price(measured.instance_type, measured.cloud, measured.region, bool(measured.spot))


def gc(args) -> Output:
    from modelferry.tasks import housekeeping

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


def blocks(args) -> Output:
    from modelferry.tasks import settings as config

    if not os.environ.get("PREFECT_API_URL"):
        raise SettingsError("PREFECT_API_URL is not set: point it at the Prefect server that should hold the blocks")
    saved = config.save_blocks()
    if not saved:
        raise SettingsError("none of the settings are in the environment: nothing to save")
    return Output(saved, lines=["saved Secret blocks: " + ", ".join(saved)])


def refresh(args) -> Output:
    from modelferry.tasks import settings as config

    config.load()
    if args.watchlist and not os.path.isfile(args.watchlist):
        raise SettingsError(f"--watchlist {args.watchlist}: no such file")
    from modelferry.flows.model_refresh import load_watchlist, model_refresh

    if args.watchlist:
        load_watchlist(args.watchlist)  # a malformed list fails here, before Prefect starts
    rows = model_refresh(args.watchlist)
    return Output(rows, rows=rows)


def deploy(args) -> Output:
    if not os.environ.get("PREFECT_API_URL"):
        raise SettingsError("PREFECT_API_URL is not set: point it at the Prefect server the workers poll")
    from modelferry.flows.deploy import deploy as create

    names = create(args.pool, args.watchlist, args.cron, args.launch_name, args.refresh_name)
    return Output(names, lines=[f"deployed to work pool {args.pool}: " + ", ".join(names),
                                f"start a worker where modelferry is installed:  prefect worker start --pool {args.pool}"])


COMMANDS: dict[str, Callable[..., Output]] = {
    "check-r2": check_r2, "stage": stage, "verify": verify, "list": list_models, "launch": launch, "bench": bench,
    "stage-and-launch": stage_and_launch, "down": down, "cost": cost, "blocks": blocks, "gc": gc,
    "refresh": refresh, "deploy": deploy}
