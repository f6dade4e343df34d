"""Peak memory while staging a large local checkpoint (default 8 GiB in 1 GiB shards).

Baseline: the peak RSS of raw `s5cmd cp` of the same files in the same run. Reports the largest
resident set of any process of ours (the modelferry process and its s5cmd child, each measured by
the kernel's ru_maxrss) against the 512 MiB goal. Files are streamed, never held whole.

    .venv/bin/python bench/stage_memory.py [--gib 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.stage_throughput import in_scratch_dir, make_checkpoint  # noqa: E402
from modelferry.tasks.clients import processes
from modelferry.tasks.offline import embedded  # noqa: E402


def peak_rss_mib(cmd: list[str], env: dict) -> tuple[float, float]:
    """(seconds, peak RSS in MiB of any child process) for one command, run in a fresh child."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "r = subprocess.run(sys.argv[1:], capture_output=True); "
             "assert r.returncode == 0, r.stderr[-2000:]; "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], env=env, capture_output=True, text=True, check=True)
    seconds, kib = out.stdout.split()
    return float(seconds), int(kib) / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=int, default=8)
    args = ap.parse_args()
    return in_scratch_dir("mf-mem-", run, args)


def run(work: Path, args) -> int:
    total = make_checkpoint(work / "ckpt", args.gib)
    with embedded.rclone_bucket(work / "data", "bench", "bench-access-3", "bench-secret-3") as bucket, \
            embedded.prefect_server(work / "prefect") as api:
        env = dict(os.environ, **bucket.env(), PREFECT_API_URL=api, MODELFERRY_CACHE=str(work / "cache"),
                   AWS_ACCESS_KEY_ID=bucket.access_key, AWS_SECRET_ACCESS_KEY=bucket.secret_key, AWS_REGION="auto")
        raw = peak_rss_mib([processes.which("s5cmd"), "--endpoint-url", bucket.endpoint, "cp", f"{work / 'ckpt'}/*",
                            "s3://bench/raw/"], env)
        shutil.rmtree(bucket.root / "bench" / "raw", ignore_errors=True)
        ours = peak_rss_mib([sys.executable, "-m", "modelferry.flows", "stage", str(work / "ckpt"), "--name", "bench/mem"], env)
    print(f"{total / 2**30:.2f} GiB in {args.gib} shards + 51 small files, loopback rclone")
    print(f"raw s5cmd cp (baseline): {raw[0]:.1f} s, peak RSS {raw[1]:.0f} MiB")
    print(f"modelferry stage:        {ours[0]:.1f} s, peak RSS {ours[1]:.0f} MiB of any process (goal < 512 MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
