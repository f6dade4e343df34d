"""The `modelferry` command. Commands that run no flow (check-r2, list, verify) don't import Prefect,
so they answer in about a second."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time

from modelferry.tasks.errors import ModelferryError, SettingsError, first_line, require_extra

EPILOG = """settings (environment):
  R2_ENDPOINT    https://<account-id>.r2.cloudflarestorage.com (any S3-compatible endpoint)
  R2_BUCKET      bucket name
  R2_ACCESS_KEY  R2 API token's access key id
  R2_SECRET_KEY  R2 API token's secret access key
  HF_TOKEN       Hugging Face token, for gated or private models
  HF_ENDPOINT    Hub mirror URL (default https://huggingface.co)
  MODELFERRY_CACHE  download cache (default ~/.cache/modelferry)

exit codes: 0 ok, 1 failed, 2 usage or settings error"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="modelferry",
        description="Stage LLM weights into R2 with a verified integrity chain, launch vLLM on SkyPilot spot GPUs that "
                    "stream them, and time every phase of the cold start.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("check-r2", help="round-trip a probe object through the bucket",
                       description="Put, head, get and delete a probe object; print endpoint, bucket and latency. "
                                   "Each kind of misconfiguration gets its own message.",
                       epilog="example:\n  modelferry check-r2", formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--json", action="store_true", help="print the result as JSON")

    s = sub.add_parser(
        "stage", help="copy a model into the bucket, verified, then publish its manifest",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Stage SOURCE (a Hub repo id org/name, or a local checkpoint directory) into "
                    "s3://$R2_BUCKET/models/<org>/<name>/<revision>/ with the Prefect flow `stage-model`: "
                    "resolve, then download, local_verify and upload pipelined per file (a file goes up as soon "
                    "as its own bytes are verified, while the next one downloads), remote_verify, publish. Files "
                    "already proven in the bucket are not sent again, so a re-run resumes and an unchanged model "
                    "sends 0 bytes. A model too big for one machine's disk or NIC can be sharded over a Dask "
                    "cluster: each worker moves its own share of the files.",
        epilog="examples:\n"
               "  modelferry stage sentence-transformers/all-MiniLM-L6-v2\n"
               "  modelferry stage meta-llama/Llama-3.1-8B-Instruct --revision main --exclude 'original/*'\n"
               "  modelferry stage ./checkpoints/step-1000 --name acme/llama-ft\n"
               "  modelferry stage deepseek-ai/DeepSeek-V3 --task-runner dask --dask-address tcp://10.0.0.5:8786\n"
               "\nSet PREFECT_API_URL to a running Prefect server to skip starting a temporary one; the log says\n"
               "how long orchestration took to start, apart from the work.")
    s.add_argument("source", help="Hub repo id (org/name) or local directory (an existing path wins)")
    s.add_argument("--revision", help="branch, tag or commit sha on the Hub (default: main)")
    s.add_argument("--include", action="append", default=[], metavar="GLOB", help="stage only matching files (repeatable)")
    s.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip matching files (repeatable)")
    s.add_argument("--name", help="org/name to stage under (required for a local directory)")
    s.add_argument("--allow-unloadable", action="store_true",
                   help="stage even without config.json or safetensors weights (vLLM could not load it)")
    s.add_argument("--replace", action="store_true",
                   help="restage a published revision with different include/exclude globs")
    s.add_argument("--no-set-current", dest="set_current", action="store_false",
                   help="don't move the model's current pointer to this revision")
    s.add_argument("--task-runner", choices=("thread", "dask"), default="thread",
                   help="thread: this machine moves every file (default); dask: shard the files over a Dask cluster")
    s.add_argument("--dask-address", metavar="ADDR",
                   help="scheduler of an existing Dask cluster, e.g. tcp://10.0.0.5:8786 (default with "
                        "--task-runner dask: a local cluster on this machine). Each worker needs the R2_* settings "
                        "(and HF_TOKEN) in its environment and must reach the bucket, the Hub and the Prefect API")
    s.add_argument("--json", action="store_true", help="print the per-step rows as JSON on stdout (logs on stderr)")

    v = sub.add_parser("verify", help="check the bucket against a published manifest",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Compare each object's size and ETag (computed by the bucket) with the manifest, "
                                   "without downloading. --deep re-reads every object and re-hashes it. The result "
                                   "is recorded for `list`.",
                       epilog="examples:\n  modelferry verify sentence-transformers/all-MiniLM-L6-v2\n"
                              "  modelferry verify acme/llama-ft --revision local-0123abcd --deep")
    v.add_argument("name", help="org/name as staged")
    v.add_argument("--revision", help="revision to check (default: the current one)")
    v.add_argument("--deep", action="store_true", help="download and re-hash every object")
    v.add_argument("--json", action="store_true", help="print the result as JSON")

    def launch_args(sp, bench_mode=False):
        sp.add_argument("name", help="model as staged (org/name), or a Hub repo id with --source hub")
        sp.add_argument("--revision", help="revision (default: the model's current one)")
        sp.add_argument("--target", choices=["sky", "local"], default="local",
                        help="sky: SkyPilot spot GPUs; local: the local target on this machine (default)")
        sp.add_argument("--mode", default="cluster",
                        help="cluster (autostop + down), job (managed job, spot recovery), serve (SkyServe, on-demand fallback)")
        sp.add_argument("--source", default="auto",
                        help="auto: the bucket if staged and verified, else the Hub; r2: bucket only; hub: Hub only")
        sp.add_argument("--strategy", default="stream",
                        help="stream: Run:ai streamer over S3; prefetch: s5cmd to local disk, then load"
                             + ("; both: compare them" if bench_mode else ""))
        sp.add_argument("--accelerators", action="append", metavar="GPU[:N]",
                        help="GPUs to allow, e.g. L4:1 or A100:2 (default: every GPU whose memory fits the model)")
        sp.add_argument("--concurrency", type=int, default=32, help="Run:ai streamer concurrency (default 32)")
        sp.add_argument("--no-compile-cache", dest="compile_cache", action="store_false",
                        help="don't restore/save vLLM's torch.compile and Triton caches through the bucket")
        sp.add_argument("--vllm-image", metavar="IMAGE",
                        help="the node's container image (default: the template's vllm/vllm-openai:v0.32.0, the "
                             "release the local target runs)")
        sp.add_argument("--ready-timeout", type=float, default=1800, metavar="SECONDS",
                        help="how long to wait for /health before tearing down (default 1800)")
        sp.add_argument("--headroom", type=float, default=1.3,
                        help="GPU memory to ask for = weights x HEADROOM (KV cache, activations; default 1.3)")
        sp.add_argument("--memory-limit", type=int, default=-1, metavar="BYTES",
                        help="Run:ai streamer CPU buffer in bytes (default -1: unlimited)")
        sp.add_argument("--idle-minutes", type=int, default=30,
                        help="--mode cluster: SkyPilot autostop (down) after this many idle minutes (default 30)")
        sp.add_argument("--on-demand", dest="use_spot", action="store_false",
                        help="on-demand instead of spot GPUs")
        sp.add_argument("--disk-size", type=int, metavar="GB",
                        help="node disk (default: 256 GB, or 2.5 x the model + 64 GB when bigger)")
        sp.add_argument("--extra-vllm-args", default="", metavar="ARGS",
                        help="more `vllm serve` arguments, e.g. '--max-model-len 8192'")
        sp.add_argument("--json", action="store_true", help="print the phase rows as JSON")

    la = sub.add_parser(
        "launch", help="serve a staged model with vLLM, streaming its weights from the bucket",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build the SkyPilot task from the model's manifest and deployments/vllm.yaml, launch it, wait "
                    "for /health, /v1/models and one completion, and print the phase timings. Keys travel as "
                    "SkyPilot secrets (set VLLM_API_KEY for --target sky). Torn down afterwards unless --keep.",
        epilog="examples:\n  modelferry launch acme/llama-ft --target sky --accelerators L4:1 --keep\n"
               "  modelferry launch acme/llama-ft --target sky --mode serve --dry-run\n"
               "  modelferry launch modelferry/tiny-llama --target local")
    launch_args(la)
    la.add_argument("--keep", action="store_true", help="leave it running (take it down with `modelferry down`)")
    la.add_argument("--dry-run", action="store_true", help="print the generated SkyPilot task (secrets redacted) and stop")

    be = sub.add_parser(
        "bench", help="time every phase of cold and warm starts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run 1 is cold (new node), later runs restart the server on the same node (warm). Each run's "
                    "phases (provision, setup, load, engine, first_token) go to its own Parquet file under "
                    "--results and the bucket's bench/ prefix, with a stacked-bar plot.",
        epilog="examples:\n  modelferry bench modelferry/tiny-llama --runs 3 --strategy both\n"
               "  modelferry bench acme/llama-ft --target sky --accelerators H100:1 --runs 2")
    launch_args(be, bench_mode=True)
    be.add_argument("--runs", type=int, default=2, help="runs per strategy (default 2: one cold, one warm)")
    be.add_argument("--results", default="results", help="results folder (default ./results)")

    sl = sub.add_parser("stage-and-launch", help="stage, verify, launch and bench in one Prefect flow",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="The flow `stage-and-launch`: stage -> verify -> launch -> bench -> teardown.",
                        epilog="example:\n  modelferry stage-and-launch modelferry/tiny-llama --runs 2")
    launch_args(sl, bench_mode=True)
    sl.add_argument("--runs", type=int, default=1, help="runs per strategy (default 1)")
    sl.add_argument("--include", action="append", default=[], metavar="GLOB")
    sl.add_argument("--exclude", action="append", default=[], metavar="GLOB")
    sl.add_argument("--keep", action="store_true", help="leave the deployment running")
    sl.add_argument("--results", default="results", help="results folder (default ./results)")

    do = sub.add_parser("down", help="take down deployments kept with --keep",
                        description="Stops kept local targets and takes down SkyPilot clusters named mf-*.")
    do.add_argument("name", nargs="?", help="deployment name (mf-...) or model name")
    do.add_argument("--all", action="store_true", help="everything modelferry launched and kept")
    do.add_argument("--target", choices=["local", "sky", "all"], default="all",
                    help="where to look (default all; sky starts SkyPilot's local API server if it isn't running)")

    co = sub.add_parser("cost", help="monthly cost of cold starts: Hub/S3 egress vs R2",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Compares pulling the model's real bytes at every launch from the Hub (free, slow) "
                                    "or S3 (egress) with keeping it in R2 (storage + read operations, no egress).",
                        epilog="example:\n  modelferry cost acme/llama-ft --launches-per-day 24")
    co.add_argument("name")
    co.add_argument("--revision")
    co.add_argument("--launches-per-day", type=float, required=True)
    co.add_argument("--s3-egress-per-gb", type=float, default=0.09, help="USD/GB (default 0.09)")
    co.add_argument("--r2-storage-per-gb-month", type=float, default=0.015, help="USD (default 0.015)")
    co.add_argument("--r2-class-b-per-million", type=float, default=0.36, help="USD (default 0.36)")
    co.add_argument("--read-request-mib", type=int, default=16, help="bytes per ranged GET, MiB (default 16)")
    co.add_argument("--json", action="store_true")

    bl = sub.add_parser("blocks", help="store the R2/HF settings as Prefect Secret blocks",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Saves each of R2_ENDPOINT, R2_BUCKET, R2_ACCESS_KEY, R2_SECRET_KEY, HF_TOKEN, "
                                    "R2_READ_ACCESS_KEY, R2_READ_SECRET_KEY found in the environment as a Secret block "
                                    "(modelferry-r2-endpoint, ...). Flows read a block when the variable is not set, "
                                    "so workers need no keys in their environment.",
                        epilog="example:\n  PREFECT_API_URL=http://127.0.0.1:4200/api modelferry blocks")
    gcp = sub.add_parser("gc", help="clean up what interrupted stages left in the bucket",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Aborts unfinished multipart uploads and removes revision prefixes that never got "
                                     "a manifest (and are not locked by a running stage), once older than the grace "
                                     "period. Published revisions are never touched. `stage` also aborts its own "
                                     "revision's leftovers when it starts.",
                         epilog="example:\n  modelferry gc --grace-hours 24 --dry-run")
    gcp.add_argument("--grace-hours", type=float, default=24, help="leave anything younger alone (default 24)")
    gcp.add_argument("--dry-run", action="store_true", help="say what would go, change nothing")
    gcp.add_argument("--compile-cache-days", type=float, metavar="DAYS",
                     help="also drop compile caches saved more than DAYS ago")
    gcp.add_argument("--json", action="store_true")
    re_ = sub.add_parser("refresh", help="re-stage the watched models whose branch moved (flow model-refresh)",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Runs the flow `model-refresh` once: for each model in the watch list, resolve "
                                     "its branch on the Hub; if it moved, stage the new commit (files unchanged since "
                                     "the current revision are copied inside the bucket), verify it, make it current "
                                     "and keep the newest `keep` revisions. The scheduled deployment runs the same flow.",
                         epilog="examples:\n  modelferry refresh\n  modelferry refresh --watchlist ./watched-models.yaml")
    re_.add_argument("--watchlist", metavar="PATH",
                     help="YAML list of models to watch (default: the list packaged with modelferry)")
    re_.add_argument("--json", action="store_true", help="print one row per model as JSON")

    de = sub.add_parser("deploy", help="create the Prefect deployments from the installed package",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Creates (or updates) `stage-and-launch/default` and the scheduled "
                                    "`model-refresh/nightly` on the Prefect server at PREFECT_API_URL, in a process "
                                    "work pool (created if missing). Their entrypoints are module paths, so a worker "
                                    "needs only `pip install modelferry` and the R2_*/HF_* settings (or the Secret "
                                    "blocks from `modelferry blocks`); no checkout. From a checkout, prefect.yaml "
                                    "does the same with `prefect deploy --all`.",
                        epilog="example:\n  export PREFECT_API_URL=http://127.0.0.1:4200/api\n"
                               "  modelferry deploy --pool local --watchlist /etc/modelferry/watched-models.yaml\n"
                               "  prefect worker start --pool local\n"
                               "  prefect deployment run stage-and-launch/default -p model=org/name --watch")
    de.add_argument("--pool", default="local", help="process work pool to deploy to (default local)")
    de.add_argument("--watchlist", metavar="PATH",
                    help="watch list path on the worker's machine for model-refresh (default: the packaged list)")
    de.add_argument("--cron", default="0 2 * * *", help="model-refresh schedule, UTC (default '0 2 * * *'; '' for none)")
    de.add_argument("--launch-name", default="default", help="name of the stage-and-launch deployment")
    de.add_argument("--refresh-name", default="nightly", help="name of the model-refresh deployment")

    li = sub.add_parser("list", help="list staged models", description="One row per published model revision.")
    li.add_argument("--json", action="store_true", help="print rows as JSON")
    li.add_argument("--compile-caches", action="store_true",
                    help="list the stored vLLM compile caches (key, files, bytes, saved_at) instead")
    return p


def _print_table(rows: list[dict]) -> None:
    from tabulate import tabulate

    print(tabulate(rows, headers="keys", tablefmt="plain", missingval="None") if rows else "(none)")


def _setup_logging(verbose: bool, json_out: bool) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("botocore", "boto3", "urllib3", "httpx", "httpcore", "filelock", "alembic"):  # alembic: SkyPilot's state DB
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_check_r2(args) -> int:
    from modelferry.tasks import settings as config
    from modelferry.tasks.bucket import check_r2

    result = check_r2(config.load())
    if args.json:
        print(json.dumps(result))
    else:
        print(f"OK  endpoint {result['endpoint']}  bucket {result['bucket']}")
        print("    put {put_ms} ms, head {head_ms} ms, get {get_ms} ms, delete {delete_ms} ms".format(**result))
    return 0


def cmd_stage(args) -> int:
    from modelferry.tasks import settings as config

    from modelferry.tasks import orchestration, request
    from modelferry.tasks.bucket import Bucket

    # Everything that can be refused is refused before Prefect starts (seconds) and before any write.
    settings = config.load()
    if args.dask_address and args.task_runner != "dask":
        raise SettingsError("--dask-address needs --task-runner dask")
    if args.task_runner == "dask":
        require_extra("prefect_dask", "dask", "--task-runner dask")
    request.check(args.source, args.name, args.include, args.exclude, args.allow_unloadable)
    Bucket(settings).probe()
    t0, cpu0 = time.perf_counter(), time.process_time()
    with orchestration.prefect_api(args.verbose) as where:
        from modelferry.flows.stage_model import stage_model
        from modelferry.flows.steps import StepFailed, startup_report

        try:
            rows = stage_model(args.source, revision=args.revision, include=args.include, exclude=args.exclude,
                               name=args.name, allow_unloadable=args.allow_unloadable, replace=args.replace,
                               set_current=args.set_current, task_runner=args.task_runner,
                               dask_address=args.dask_address).rows
            failure = None
        except StepFailed as exc:
            rows, failure = exc.rows, exc
        logging.getLogger("modelferry").info("stage: %s", startup_report(t0, cpu0, where))
    if args.json:
        print(json.dumps(rows))
    else:
        _print_table(rows)
    if failure:
        cause = failure.cause
        print(f"error: {cause}" if isinstance(cause, ModelferryError) else f"error: {failure}", file=sys.stderr)
        return 2 if isinstance(cause, SettingsError) else 1
    return 0


def cmd_verify(args) -> int:
    from modelferry.tasks import catalog
    from modelferry.tasks import settings as config
    from modelferry.tasks.bucket import Bucket
    from modelferry.tasks.errors import IntegrityError

    bucket = Bucket(config.load())
    try:
        record = catalog.verify(bucket, args.name, args.revision, args.deep)
    except IntegrityError as exc:
        if args.json:
            print(json.dumps({"name": args.name, "ok": False, "bad": exc.bad_files, "error": str(exc)}))
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(record))
    else:
        how = "re-hashed" if args.deep else "size + ETag"
        print(f"OK  {record['name']}@{record['revision']}: {record['files']} files, {record['bytes']:,} bytes ({how})")
    return 0


def cmd_list(args) -> int:
    from modelferry.tasks import catalog
    from modelferry.tasks import settings as config
    from modelferry.tasks.bucket import Bucket

    if args.compile_caches:
        rows = catalog.compile_caches(Bucket(config.load()))
        print(json.dumps(rows)) if args.json else _print_table(rows)
        return 0
    rows = catalog.list_models(Bucket(config.load()))
    if args.json:
        print(json.dumps(rows))
    else:
        _print_table([{k: r[k] for k in ("name", "revision", "current", "files", "bytes", "verified", "staged_at", "uri")}
                      for r in rows])
    return 0


def _launch_options(args) -> dict:
    """The launch flags as stage-and-launch's parameters (the same names)."""
    return dict(target=args.target, mode=args.mode, source=args.source, strategy=args.strategy,
                accelerators=args.accelerators, concurrency=args.concurrency, ready_timeout=args.ready_timeout,
                compile_cache=args.compile_cache, vllm_image=args.vllm_image, headroom=args.headroom,
                memory_limit=args.memory_limit, idle_minutes=args.idle_minutes, use_spot=args.use_spot,
                disk_size=args.disk_size, extra_vllm_args=args.extra_vllm_args)


def _validate_launch(args) -> None:
    """Check options before paying for Prefect's start-up, with the checks the flow itself runs."""
    from modelferry.tasks.sky import check_launch, launch_options

    params = _launch_options(args)
    strategies = ["stream", "prefetch"] if args.strategy == "both" else [args.strategy]
    for strategy in strategies:
        check_launch(args.target, args.source, launch_options(**{**params, "strategy": strategy}))
    if getattr(args, "runs", 1) < 1:
        raise SettingsError("--runs must be at least 1")


def _run_flow(args, **params) -> int:
    from modelferry.tasks import settings as config

    from modelferry.tasks import orchestration

    config.load()
    _validate_launch(args)
    if args.target == "local":
        from modelferry.tasks.local_target import vllm_python

        vllm_python()  # before paying for Prefect's start-up: says how to get it
    with orchestration.prefect_api(args.verbose):
        from modelferry.flows.stage_and_launch import stage_and_launch
        from modelferry.flows.steps import StepFailed

        try:
            launched = stage_and_launch(args.name, revision=args.revision, **_launch_options(args), **params)
            rows, saved, failure = launched.rows, launched.saved, None
        except StepFailed as exc:
            rows, saved, failure = [], None, exc
    if args.json:
        print(json.dumps(rows))
    elif rows:
        cols = ["strategy", "kind", "run", "provision_s", "setup_s", "load_s", "engine_s", "first_token_s", "total_s",
                "compile_cache"]
        _print_table([{k: r[k] for k in cols} for r in rows])
        if saved:
            print(f"results: {saved['dir']}  plot: {saved['png']}")
            if saved.get("note"):
                print(saved["note"])
    if failure:
        print(f"error: {failure.cause if isinstance(failure.cause, ModelferryError) else failure}", file=sys.stderr)
        return 2 if isinstance(failure.cause, SettingsError) else 1
    return 0


def cmd_launch(args) -> int:
    if args.strategy == "both":
        raise SettingsError("--strategy both is for `bench`; launch takes stream or prefetch")
    if args.dry_run:
        from modelferry.tasks import launcher, sky
        from modelferry.tasks import settings as config
        from modelferry.tasks.sky import launch_options

        _validate_launch(args)
        dep = launcher.plan(config.load(), args.name, args.revision, args.target, args.source,
                            launch_options(**_launch_options(args)), "dry-run")
        print(f"# {dep.name}: {dep.model}@{dep.revision} from {dep.source}")
        print(sky.redacted_yaml(dep.cfg, dep.secrets))
        return 0
    return _run_flow(args, stage=False, runs=1, keep=args.keep)


def cmd_bench(args) -> int:
    return _run_flow(args, stage=False, runs=args.runs, results_dir=args.results)


def cmd_stage_and_launch(args) -> int:
    return _run_flow(args, stage=True, runs=args.runs, include=args.include, exclude=args.exclude, keep=args.keep,
                     results_dir=args.results)


def cmd_down(args) -> int:
    from modelferry.tasks import launcher

    if not args.name and not args.all:
        raise SettingsError("name a deployment (or model), or pass --all")
    taken = launcher.down(args.name, args.all, args.target)
    print("took down: " + (", ".join(taken) if taken else "nothing"))
    return 0


def cmd_cost(args) -> int:
    from modelferry.tasks import catalog, cost
    from modelferry.tasks import settings as config
    from modelferry.tasks.bucket import Bucket

    manifest = catalog.find_manifest(Bucket(config.load()), args.name, args.revision)
    prices = cost.Prices(s3_egress_per_gb=args.s3_egress_per_gb, r2_storage_per_gb_month=args.r2_storage_per_gb_month,
                         r2_class_b_per_million=args.r2_class_b_per_million)
    try:
        result = cost.monthly(manifest.total_bytes, args.launches_per_day, prices, args.read_request_mib * 2**20,
                              files=len(manifest.files))
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    result = {"name": args.name, "revision": manifest.revision, **result}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.name}@{manifest.revision[:12]}: {result['gb_per_launch']} GB x {result['launches_per_month']} launches/month")
        print(f"  from S3 (egress ${args.s3_egress_per_gb}/GB): ${result['s3_egress_usd']:,.2f}/month")
        print(f"  from the Hub: ${result['hub_usd']:,.2f}/month in fees (paid in minutes of GPU time instead)")
        print(f"  from R2: ${result['r2_usd']:,.2f}/month (storage ${result['r2_storage_usd']}, "
              f"{result['r2_read_ops']:,} reads, no egress)")
    return 0


def cmd_gc(args) -> int:
    from modelferry.tasks import catalog
    from modelferry.tasks import settings as config
    from modelferry.tasks.bucket import Bucket

    if args.grace_hours < 0:
        raise SettingsError("--grace-hours must be 0 or more")
    bucket = Bucket(config.load())
    result = catalog.gc(bucket, args.grace_hours * 3600, args.dry_run)
    if args.compile_cache_days is not None:
        result["removed_compile_caches"] = catalog.drop_compile_caches(bucket, args.compile_cache_days * 86400,
                                                                       args.dry_run)
    if args.json:
        print(json.dumps(result))
    else:
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb} {len(result['aborted_uploads'])} unfinished multipart upload(s), "
              f"{len(result['removed_revisions'])} unpublished revision(s) ({result['removed_objects']} objects)")
        for rev in result["removed_revisions"]:
            print(f"  {rev}")
        if "removed_compile_caches" in result:
            print(f"{verb} {len(result['removed_compile_caches'])} compile cache(s)")
    return 0


def cmd_blocks(args) -> int:
    from modelferry.tasks import settings as config

    if not os.environ.get("PREFECT_API_URL"):
        raise SettingsError("PREFECT_API_URL is not set: point it at the Prefect server that should hold the blocks")
    saved = config.save_blocks()
    if not saved:
        raise SettingsError("none of the settings are in the environment: nothing to save")
    print("saved Secret blocks: " + ", ".join(saved))
    return 0


def cmd_refresh(args) -> int:
    from modelferry.tasks import settings as config

    config.load()
    if args.watchlist and not os.path.isfile(args.watchlist):
        raise SettingsError(f"--watchlist {args.watchlist}: no such file")
    from modelferry.flows.model_refresh import load_watchlist, model_refresh

    if args.watchlist:
        load_watchlist(args.watchlist)  # a malformed list fails here, before Prefect starts
    rows = model_refresh(args.watchlist)
    print(json.dumps(rows)) if args.json else _print_table(rows)
    return 0


def cmd_deploy(args) -> int:
    if not os.environ.get("PREFECT_API_URL"):
        raise SettingsError("PREFECT_API_URL is not set: point it at the Prefect server the workers poll")
    from modelferry.flows.deploy import deploy

    names = deploy(args.pool, args.watchlist, args.cron, args.launch_name, args.refresh_name)
    print(f"deployed to work pool {args.pool}: " + ", ".join(names))
    print(f"start a worker where modelferry is installed:  prefect worker start --pool {args.pool}")
    return 0


COMMANDS = {"check-r2": cmd_check_r2, "stage": cmd_stage, "verify": cmd_verify, "list": cmd_list,
            "launch": cmd_launch, "bench": cmd_bench, "stage-and-launch": cmd_stage_and_launch, "down": cmd_down,
            "cost": cmd_cost, "blocks": cmd_blocks, "gc": cmd_gc, "refresh": cmd_refresh, "deploy": cmd_deploy}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: unwinds the command like Ctrl-C does, so every `finally` runs (s5cmd
    killed, the lock released, the temporary Prefect server stopped)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


GRACE_S = 15.0  # how long the clean unwinding may take before the command kills what it started and exits
_state = {"first": None, "raised": False, "said": False}
_state_lock = threading.Lock()


def _on_signal(signum, frame) -> None:
    """SIGINT/SIGTERM, run in the main thread: the first unwinds the command (Interrupted); later
    ones must not break the unwinding (the watcher below acts on them)."""
    with _state_lock:
        if _state["raised"]:
            return
        _state["raised"] = True
    raise Interrupted(signum)


def _watch_signals() -> None:
    """Count every SIGINT/SIGTERM as it arrives, on a thread of its own: Python runs a handler once
    for signals that arrive while the main thread is busy in C code, so a second Ctrl-C would be
    lost. The first starts a grace period for the clean unwinding; the second, or the end of the
    grace period, kills what we started and exits at once."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)

    def watch() -> None:
        while True:
            for signum in os.read(read, 64):
                if signum not in (signal.SIGINT, signal.SIGTERM):
                    continue
                if _state["first"] is not None:
                    _exit_now(signum)
                _state["first"] = signum
                threading.Thread(target=lambda: (time.sleep(GRACE_S), _exit_now(signum)), name="grace",
                                 daemon=True).start()

    threading.Thread(target=watch, name="signals", daemon=True).start()


def _exit_now(signum: int) -> None:
    from modelferry.tasks import processes

    processes.kill_all()
    _say_interrupted()
    os._exit(128 + (_state["first"] or signum))


def _say_interrupted() -> None:
    with _state_lock:
        if _state["said"]:
            return
        _state["said"] = True
    print("interrupted", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose, getattr(args, "json", False))
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _on_signal)
        _watch_signals()
    try:
        return COMMANDS[args.command](args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModelferryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        _say_interrupted()
        return 128 + getattr(exc, "signum", signal.SIGINT)
    except Exception as exc:  # noqa: BLE001 - a bug or an untyped failure: still one line, -v for the rest
        if args.verbose:
            raise
        from modelferry.tasks.settings import scrub

        print(f"error: {type(exc).__name__}: {scrub(first_line(exc))} "
              "(run with -v for the traceback)", file=sys.stderr)
        return 1
