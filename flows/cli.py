"""The `modelferry` command. Commands that run no flow (check-r2, list, verify) don't import Prefect,
so they answer in about a second."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from tasks.errors import ModelferryError, SettingsError

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
        description="Stage LLM weights into R2 with a verified integrity chain; list and verify what is staged.",
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
                    "resolve, download, local_verify, upload, remote_verify, publish. Files already proven "
                    "in the bucket are not sent again, so a re-run resumes and an unchanged model sends 0 bytes.",
        epilog="examples:\n"
               "  modelferry stage sentence-transformers/all-MiniLM-L6-v2\n"
               "  modelferry stage meta-llama/Llama-3.1-8B-Instruct --revision main --exclude 'original/*'\n"
               "  modelferry stage ./checkpoints/step-1000 --name acme/llama-ft\n")
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

    li = sub.add_parser("list", help="list staged models", description="One row per published model revision.")
    li.add_argument("--json", action="store_true", help="print rows as JSON")
    return p


def _print_table(rows: list[dict]) -> None:
    import pandas as pd

    if not rows:
        print("(none)")
        return
    df = pd.DataFrame(rows)
    print(df.to_string(index=False))


def _setup_logging(verbose: bool, json_out: bool) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("botocore", "boto3", "urllib3", "httpx", "httpcore", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_check_r2(args) -> int:
    from tasks import settings as config
    from tasks.bucket import check_r2

    result = check_r2(config.load())
    if args.json:
        print(json.dumps(result))
    else:
        print(f"OK  endpoint {result['endpoint']}  bucket {result['bucket']}")
        print("    put {put_ms} ms, head {head_ms} ms, get {get_ms} ms, delete {delete_ms} ms".format(**result))
    return 0


def cmd_stage(args) -> int:
    from tasks import settings as config

    config.load()  # fail on settings before paying for Prefect's start-up
    t0 = time.perf_counter()
    from flows.stage_model import stage_model
    from flows.steps import StepFailed

    try:
        rows = stage_model(args.source, revision=args.revision, include=args.include, exclude=args.exclude,
                           name=args.name, allow_unloadable=args.allow_unloadable, replace=args.replace,
                           set_current=args.set_current)
        failure = None
    except StepFailed as exc:
        rows, failure = exc.rows, exc
    logging.getLogger("modelferry").info("stage finished in %.1f s", time.perf_counter() - t0)
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
    from tasks import catalog
    from tasks import settings as config
    from tasks.bucket import Bucket
    from tasks.errors import IntegrityError

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
    from tasks import catalog
    from tasks import settings as config
    from tasks.bucket import Bucket

    rows = catalog.list_models(Bucket(config.load()))
    if args.json:
        print(json.dumps(rows))
    else:
        _print_table([{k: r[k] for k in ("name", "revision", "current", "files", "bytes", "verified", "staged_at", "uri")}
                      for r in rows])
    return 0


COMMANDS = {"check-r2": cmd_check_r2, "stage": cmd_stage, "verify": cmd_verify, "list": cmd_list}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose, getattr(args, "json", False))
    try:
        return COMMANDS[args.command](args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModelferryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
