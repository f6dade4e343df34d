"""Overlap of Hub download, hashing and upload when the network is the bottleneck.

Model: SHARDS safetensors shards of MIB MiB (LFS) plus config.json, in an olah mirror reached through
a loopback proxy capped at RATE MiB/s; bucket: `rclone serve s3 --bwlimit RATE M`. Per round,
interleaved, on the same model and the same two links:

- download alone: `huggingface_hub.snapshot_download` (8 workers) into a fresh directory;
- upload alone: `s5cmd cp` of those files into the bucket;
- `modelferry stage REPO` with a fresh cache and name, timed by its own report of the work
  (orchestration start-up is printed separately and not counted).

Prints medians of ROUNDS, the ratio of the stage to the slower of download-alone and upload-alone
(goal <= 1.2) and to the naive download-then-upload (their sum).

    .venv/bin/python bench/hub_overlap.py [--shards 16] [--mib 8] [--rate 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.stage_throughput import in_scratch_dir, stage_report  # noqa: E402
from bench.throttle import throttled  # noqa: E402
from modelferry.tasks.clients import processes
from modelferry.tasks.offline import embedded  # noqa: E402

MiB = 2**20
REPO = "bench/overlap"


def make_repo(mirror: Path, shards: int, mib: int) -> int:
    files: dict[str, bytes] = {"config.json": b'{"architectures": ["Bench"]}'}
    for i in range(shards):
        files[f"model-{i + 1:05d}-of-{shards:05d}.safetensors"] = os.urandom(mib * MiB)
    embedded.commit_files(mirror, REPO, files, lfs_files={p for p in files if p.endswith(".safetensors")})
    return sum(len(b) for b in files.values())


def busy_fraction(fn):
    """Run fn(); return (its result, share of this machine's CPU time that was busy meanwhile)."""
    def ticks():
        fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait

    (t0, i0) = ticks()
    out = fn()
    (t1, i1) = ticks()
    return out, 1 - (i1 - i0) / max(1, t1 - t0)


def run(work: Path, args) -> int:
    total = make_repo(work / "mirror", args.shards, args.mib)
    rate = args.rate * MiB
    results: dict[str, list[float]] = {"download alone": [], "upload alone": [], "modelferry stage": []}
    cpu_busy: list[float] = []
    with embedded.olah_mirror(work / "mirror", work / "olah") as hub, \
            throttled(int(hub.rsplit(":", 1)[1]), rate) as hub_port, \
            embedded.rclone_bucket(work / "data", "bench", "bench-access-1", "bench-secret-1",
                                   extra_args=("--bwlimit", f"{args.rate}M")) as bucket, \
            embedded.prefect_server(work / "prefect") as api:
        slow_hub = f"http://127.0.0.1:{hub_port}"
        env = dict(os.environ, **bucket.env(), HF_ENDPOINT=slow_hub, HF_HUB_DISABLE_TELEMETRY="1",
                   HF_HUB_DISABLE_XET="1", PREFECT_API_URL=api, PREFECT_HOME=str(work / "prefect"),
                   AWS_ACCESS_KEY_ID=bucket.access_key, AWS_SECRET_ACCESS_KEY=bucket.secret_key, AWS_REGION="auto")
        for r in range(args.rounds):
            dest = work / f"dl-{r}"
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import sys; from huggingface_hub import snapshot_download; "
                            "snapshot_download(sys.argv[1], local_dir=sys.argv[2], max_workers=8)", REPO, str(dest)],
                           env=env, check=True, capture_output=True)
            results["download alone"].append(time.perf_counter() - t)
            t = time.perf_counter()
            subprocess.run([processes.which("s5cmd"), "--endpoint-url", bucket.endpoint, "cp", "--exclude", ".cache/*",
                            f"{dest}/*", f"s3://bench/raw-{r}/"], env=env, check=True, capture_output=True)
            results["upload alone"].append(time.perf_counter() - t)
            shutil.rmtree(dest, ignore_errors=True)
            proc, busy = busy_fraction(lambda: subprocess.run(
                [sys.executable, "-m", "modelferry.flows", "stage", REPO, "--name", f"bench/run-{r}", "--allow-unloadable", "--json"],
                env={**env, "MODELFERRY_CACHE": str(work / f"cache-{r}"), "HF_HOME": str(work / f"hf-{r}")}, capture_output=True, text=True))
            cpu_busy.append(busy)
            if proc.returncode:
                raise SystemExit(f"stage failed: {proc.stderr[-3000:]}")
            start_s, _, work_s = stage_report(proc.stderr)
            results["modelferry stage"].append(work_s)
            shutil.rmtree(work / f"cache-{r}", ignore_errors=True)
            print(f"round {r + 1}/{args.rounds}: start-up {start_s} s", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    slower = max(med["download alone"], med["upload alone"])
    naive = med["download alone"] + med["upload alone"]
    print(f"\n{args.shards} shards x {args.mib} MiB + config.json ({total / 1e6:.0f} MB); Hub link and bucket link "
          f"each capped at {args.rate} MiB/s; median of {args.rounds} interleaved rounds")
    print(f"{'method':36s} {'seconds':>8s} {'MB/s':>7s}")
    for name, seconds in med.items():
        print(f"{name:36s} {seconds:8.2f} {total / seconds / 1e6:7.1f}")
    print(f"{'naive download then upload (sum)':36s} {naive:8.2f} {total / naive / 1e6:7.1f}")
    print(f"\nCPU busy during the stage (median): {statistics.median(cpu_busy):.0%} of both cores "
          "(the Hub stand-in, the proxy and the bucket share them)")
    print(f"stage / slower of the two alone = {med['modelferry stage'] / slower:.2f} (goal <= 1.2); "
          f"stage / naive sum = {med['modelferry stage'] / naive:.2f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--mib", type=int, default=8)
    ap.add_argument("--rate", type=int, default=10, help="MiB/s of each link")
    ap.add_argument("--rounds", type=int, default=3)
    return in_scratch_dir("mf-overlap-", run, ap.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
