"""`make demo`: the whole path offline, on real local stand-ins and real vLLM.

Starts an offline Hub (olah) holding the tiny Llama (tasks/offline/tiny_llama.py) and an S3 bucket
(rclone serve s3), then runs the CLI in this process: check-r2, stage, verify, list, a second stage
(an unchanged model sends 0 bytes), the generated SkyPilot task, stage-and-launch on the local target
(vLLM streams the weights over s3://, cold, then warm on the same node), bench with prefetch on a
fresh node, and the cost comparison. Everything it starts is stopped on the way out.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from modelferry.flows import process_defaults
from modelferry.tasks.offline import embedded, tiny_llama
from modelferry.tasks.settings import read

REPO = tiny_llama.REPO


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def steps(results: Path) -> list[list[str]]:
    """The demo's commands, in order: what a user would type after `modelferry`."""
    return [["check-r2"], ["stage", REPO], ["verify", REPO], ["list"], ["stage", REPO],
            ["launch", REPO, "--target", "local", "--dry-run"],
            ["stage-and-launch", REPO, "--target", "local", "--strategy", "stream", "--runs", "2",
             "--results", str(results)],
            ["bench", REPO, "--target", "local", "--strategy", "prefetch", "--runs", "1", "--results", str(results)],
            ["cost", REPO, "--launches-per-day", "24"]]


def main() -> int:
    process_defaults()
    root = Path(read("MODELFERRY_DEMO_DIR")).resolve()
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    mirror = root / "hub-mirror"
    commit = embedded.commit_files(mirror, REPO, tiny_llama.files(), "tiny Llama, seeded, BERT tokenizer")
    with embedded.olah_mirror(mirror, root / "olah") as hub_url, \
            embedded.rclone_bucket(root / "bucket", "modelferry-demo",
                                   read("MODELFERRY_DEMO_ACCESS_KEY"), read("MODELFERRY_DEMO_SECRET_KEY")) as bucket:
        os.environ.update(bucket.env(), HF_ENDPOINT=hub_url, MODELFERRY_CACHE=str(root / "cache"),
                          PREFECT_HOME=str(root / "prefect"))
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")  # a busy 2-core box
        print(f"offline Hub (olah) at {hub_url} with {REPO}@{commit[:12]}; bucket (rclone serve s3) at "
              f"{bucket.endpoint}, objects under {bucket.root / bucket.bucket}; services up in {time.perf_counter() - t0:.1f} s")
        from modelferry.flows.cli import main as cli

        for args in steps(root / "results"):
            banner("modelferry " + " ".join(args))
            rc = cli(args)
            if rc:
                print(f"demo failed at `modelferry {' '.join(args)}` (exit {rc})", file=sys.stderr)
                return rc
    banner(f"demo done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
