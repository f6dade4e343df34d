"""The `modelferry` command: the parser, one output path (a table or `--json`) and one mapping from
failure to exit code. What each command does is in `commands.py`."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from modelferry.flows import interrupts, process_defaults
from modelferry.flows.commands import COMMANDS, Output
from modelferry.tasks import pins
from modelferry.tasks.cost import HUB_MB_S
from modelferry.tasks.errors import ModelferryError, SettingsError, StepFailed, first_line
from modelferry.tasks.options import add_flags
from modelferry.tasks.settings import check_all, help_epilog

EPILOG = help_epilog() + "\n\nexit codes: 0 ok, 1 failed, 2 usage or settings error"


def parser() -> argparse.ArgumentParser:
    """The whole command line; each command's function is `commands.COMMANDS[name]`."""
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
    v.add_argument("model", help="the model's name as staged (org/name)")
    v.add_argument("--revision", help="revision to check (default: the current one)")
    v.add_argument("--deep", action="store_true", help="download and re-hash every object")
    v.add_argument("--json", action="store_true", help="print the result as JSON")

    def launch_args(sp, bench_mode=False):
        sp.add_argument("model", help="the model's name as staged (org/name), or a Hub repo id with --source hub"
                        + ("; with --name, a local checkpoint directory" if sp.prog.endswith("stage-and-launch") else ""))
        sp.add_argument("--revision", help="revision (default: the model's current one)")
        add_flags(sp, "; both: compare them" if bench_mode else "")
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
                    "phases (provision, setup, boot, weights, engine, first_token) go to its own Parquet file under "
                    "--results and the bucket's bench/ prefix, with a stacked-bar plot.",
        epilog="examples:\n  modelferry bench modelferry/tiny-llama --runs 3 --strategy both\n"
               "  modelferry bench acme/llama-ft --target sky --accelerators H100:1 --runs 2")
    launch_args(be, bench_mode=True)
    be.add_argument("--runs", type=int, default=2, help="runs per strategy (default 2: one cold, one warm)")
    be.add_argument("--results", default="results", help="results folder (default ./results)")

    sl = sub.add_parser("stage-and-launch", help="stage, verify, launch and bench in one Prefect flow",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="The flow `stage-and-launch`: stage -> verify -> launch -> bench -> teardown.",
                        epilog="examples:\n  modelferry stage-and-launch modelferry/tiny-llama --runs 2\n"
                               "  modelferry stage-and-launch ./checkpoints/step-1000 --name acme/llama-ft --target sky")
    launch_args(sl, bench_mode=True)
    sl.add_argument("--name", metavar="ORG/NAME",
                    help="stage MODEL (a local checkpoint directory on this machine) under the name ORG/NAME, as "
                         "`stage DIR --name` does, and launch that")
    sl.add_argument("--runs", type=int, default=1, help="runs per strategy (default 1)")
    sl.add_argument("--include", action="append", default=[], metavar="GLOB")
    sl.add_argument("--exclude", action="append", default=[], metavar="GLOB")
    sl.add_argument("--keep", action="store_true", help="leave the deployment running")
    sl.add_argument("--results", default="results", help="results folder (default ./results)")

    do = sub.add_parser("down", help="take down deployments kept with --keep",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Stops kept local targets and takes down SkyPilot clusters named mf-*.",
                        epilog="examples:\n  modelferry down mf-tiny-llama-1a2b3c4d\n  modelferry down modelferry/tiny-llama\n"
                               "  modelferry down --all --target local")
    do.add_argument("what", nargs="?", metavar="CLUSTER|MODEL",
                    help="a deployment's cluster (mf-...), or a model's name: its kept deployments")
    do.add_argument("--all", action="store_true", help="everything modelferry launched and kept")
    do.add_argument("--target", choices=["local", "sky", "all"], default="all",
                    help="where to look (default all; sky starts SkyPilot's local API server if it isn't running)")

    co = sub.add_parser("cost", help="what cold starts cost: GPU minutes, egress and storage",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Compares pulling the model's real bytes at every launch from the Hub (free, slow) "
                                    "or S3 (egress) with keeping it in R2 (storage + read operations, no egress), and "
                                    "the GPU time each cold start bills: the model's measured starts (its bench rows "
                                    "in the bucket) against a start from the Hub estimated from the model's size. "
                                    "The hourly price is SkyPilot's catalog price of the instance the starts ran on, "
                                    "else --gpu-price.",
                        epilog="examples:\n  modelferry cost acme/llama-ft --launches-per-day 24\n"
                               "  modelferry cost acme/llama-ft --launches-per-day 24 --gpu-price 0.80 --hub-mb-s 60")
    co.add_argument("model", help="the model's name as staged (org/name)")
    co.add_argument("--revision")
    co.add_argument("--launches-per-day", type=float, required=True)
    co.add_argument("--s3-egress-per-gb", type=float, default=0.09, help="USD/GB (default 0.09)")
    co.add_argument("--r2-storage-per-gb-month", type=float, default=0.015, help="USD (default 0.015)")
    co.add_argument("--r2-class-b-per-million", type=float, default=0.36, help="USD (default 0.36)")
    co.add_argument("--read-request-mib", type=int, default=16, help="bytes per ranged GET, MiB (default 16)")
    co.add_argument("--gpu-price", type=float, metavar="USD_PER_HOUR",
                    help="the GPU node's price per hour (default: SkyPilot's catalog price of the instance the "
                         "measured starts ran on)")
    co.add_argument("--hub-mb-s", type=float, default=HUB_MB_S, metavar="MB_S",
                    help=f"the Hub download rate a start from the Hub is estimated at (default {HUB_MB_S:g}: the 8-12 minutes "
                         "users report for an 8B model's 16 GB, at 10 minutes)")
    co.add_argument("--json", action="store_true")

    sub.add_parser("blocks", help="store the R2/HF settings as Prefect Secret blocks",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Saves each of R2_ENDPOINT, R2_BUCKET, R2_ACCESS_KEY, R2_SECRET_KEY, HF_TOKEN, "
                                    "R2_READ_ACCESS_KEY, R2_READ_SECRET_KEY found in the environment as a Secret block "
                                    "(modelferry-r2-endpoint, ...). Flows read a block when the variable is not set, "
                                    "so workers need no keys in their environment.",
                        epilog="example:\n  export PREFECT_API_URL=http://127.0.0.1:4200/api\n  modelferry blocks")
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
    de.add_argument("--cron", default=pins.NIGHTLY, help=f"model-refresh schedule, UTC (default '{pins.NIGHTLY}'; '' for none)")
    de.add_argument("--launch-name", default="default", help="name of the stage-and-launch deployment")
    de.add_argument("--refresh-name", default="nightly", help="name of the model-refresh deployment")

    li = sub.add_parser("list", help="list staged models", formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="One row per published model revision: its files, bytes, whether it is the "
                                    "current one, and its last verification.",
                        epilog="examples:\n  modelferry list\n  modelferry list --compile-caches --json")
    li.add_argument("--json", action="store_true", help="print rows as JSON")
    li.add_argument("--compile-caches", action="store_true",
                    help="list the stored vLLM compile caches (key, files, bytes, saved_at) instead")
    return p


def _print_table(rows: list[dict]) -> None:
    from tabulate import tabulate

    print(tabulate(rows, headers="keys", tablefmt="plain", missingval="None") if rows else "(none)")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("botocore", "boto3", "urllib3", "httpx", "httpcore", "filelock", "alembic"):  # alembic: SkyPilot's state DB
        logging.getLogger(noisy).setLevel(logging.WARNING)


def show(out: Output, as_json: bool) -> None:
    """The one output path: `data` as JSON on stdout, or the rows as a table and the lines as text."""
    if as_json:
        print(json.dumps(out.data))
        return
    if out.rows is not None:
        _print_table(out.rows)
    for line in out.lines:
        print(line)


def exit_code(exc: BaseException) -> int:
    """0 ok, 1 failed, 2 usage or settings error, 128+N killed by signal N; a failed step by its cause."""
    if isinstance(exc, StepFailed):
        exc = exc.cause
    if isinstance(exc, KeyboardInterrupt):
        return 128 + getattr(exc, "signum", signal.SIGINT)
    return 2 if isinstance(exc, SettingsError) else 1


def error_line(exc: BaseException) -> str:
    """The one line a failure prints: our errors already name the fix; anything else says -v shows more."""
    from modelferry.tasks.settings import scrub

    if isinstance(exc, StepFailed):
        exc = exc.cause if isinstance(exc.cause, ModelferryError) else exc
    if isinstance(exc, ModelferryError):
        return f"error: {exc}"
    return f"error: {type(exc).__name__}: {scrub(first_line(exc))} (run with -v for the traceback)"


def main(argv: list[str] | None = None) -> int:
    process_defaults()
    args = parser().parse_args(argv)
    _setup_logging(args.verbose)
    interrupts.install()
    try:
        check_all()  # a variable the run would read later is refused now, by name
        out = COMMANDS[args.command](args)
    except KeyboardInterrupt as exc:
        interrupts.say_interrupted()
        return exit_code(exc)
    except Exception as exc:  # noqa: BLE001 - a bug or an untyped failure is still one line; -v for the rest
        if args.verbose and not isinstance(exc, ModelferryError):
            raise
        print(error_line(exc), file=sys.stderr)
        return exit_code(exc)
    show(out, getattr(args, "json", False))
    if out.failure:
        print(error_line(out.failure), file=sys.stderr)
        return exit_code(out.failure)
    return 0
