"""Staging throughput and client CPU against raw s5cmd, on the same data and the same local bucket.

Data: a local checkpoint of GIB x 1 GiB shards plus 50 small files. Bucket: `rclone serve s3` on
loopback (started here). Per round, interleaved: raw `s5cmd cp` (the baseline; it verifies nothing,
though it sends a Content-MD5 with every part), the same plus one listing (the bucket computing its
ETags), `modelferry stage` (verification included, fresh name and cache each time; Prefect API
reused, and the orchestration start-up it reports is shown apart from the work), and boto3's
default `upload_file`. Prints medians of ROUNDS, ratios to s5cmd, and client CPU-seconds per GB
against s5cmd's plus one hashlib.sha256 pass, and against the floor of an ETag-proven stage.

    .venv/bin/python bench/stage_throughput.py [--gib 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modelferry.tasks.clients import processes
from modelferry.tasks.offline import embedded  # noqa: E402

MiB = 2**20


def make_checkpoint(root: Path, gib: int) -> int:
    root.mkdir(parents=True)
    block = os.urandom(64 * MiB)
    for i in range(gib):
        with open(root / f"model-{i + 1:05d}-of-{gib:05d}.safetensors", "wb") as f:
            for j in range(16):  # 1 GiB, each 64 MiB block salted so parts differ
                f.write(j.to_bytes(8, "little") + i.to_bytes(8, "little") + block[16:])
    for i in range(50):
        (root / "extra" / f"small-{i:02d}.json").parent.mkdir(exist_ok=True)
        (root / "extra" / f"small-{i:02d}.json").write_bytes(os.urandom(4096 * (i + 1)))
    (root / "config.json").write_text('{"architectures": ["Bench"]}')
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def timed(cmd: list[str], env: dict) -> tuple[float, float, subprocess.CompletedProcess]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{cmd[:4]} failed: {proc.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), proc


BOTO3 = """
import os, sys, boto3
from botocore.config import Config
from pathlib import Path
root, bucket, prefix = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
s3 = boto3.client("s3", endpoint_url=os.environ["R2_ENDPOINT"], aws_access_key_id=os.environ["R2_ACCESS_KEY"],
                  aws_secret_access_key=os.environ["R2_SECRET_KEY"], region_name="auto",
                  config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required"))
for p in sorted(root.rglob("*")):
    if p.is_file():
        s3.upload_file(str(p), bucket, prefix + p.relative_to(root).as_posix())
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    return in_scratch_dir("mf-bench-", run, args)


def in_scratch_dir(prefix: str, fn, args) -> int:
    """Run `fn(work_dir, args)` in a fresh temporary directory, removed afterwards (GBs of data)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        return fn(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def stage_report(stderr: str) -> tuple[float, float, float]:
    """(start-up s, start-up CPU-s, work s) from the line `modelferry stage` logs when it ends."""
    found = re.search(r"orchestration start-up ([\d.]+) s, ([\d.]+) CPU-s .*, work ([\d.]+) s", stderr)
    if not found:
        raise SystemExit(f"no start-up/work report in the stage's log: {stderr[-2000:]}")
    start_s, start_cpu, work_s = (float(x) for x in found.groups())
    return start_s, start_cpu, work_s


def hash_pass(root: Path, algo: str) -> float:
    """CPU-seconds of one hashlib pass over every file under `root`."""
    t = time.process_time()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                h = hashlib.new(algo)
                while chunk := f.read(8 * MiB):
                    h.update(chunk)
    return time.process_time() - t


LISTING = """
import os, sys, boto3
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url=os.environ["R2_ENDPOINT"], aws_access_key_id=os.environ["R2_ACCESS_KEY"],
                  aws_secret_access_key=os.environ["R2_SECRET_KEY"], region_name="auto",
                  config=Config(s3={"addressing_style": "path"}))
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=sys.argv[1], Prefix=sys.argv[2]):
    [o["ETag"] for o in page.get("Contents", [])]
"""


def run(work: Path, args) -> int:
    total = make_checkpoint(work / "ckpt", args.gib)
    sha_cpu, md5_cpu = (hash_pass(work / "ckpt", algo) for algo in ("sha256", "md5"))
    results: dict[str, list[tuple[float, float]]] = {"s5cmd cp (baseline)": [], "modelferry stage": [],
                                                     "boto3 upload_file": []}
    startup: list[tuple[float, float]] = []
    with embedded.rclone_bucket(work / "data", "bench", "bench-access-1", "bench-secret-1") as bucket, \
            embedded.prefect_server(work / "prefect") as api:
        env = dict(os.environ, **bucket.env(), PREFECT_API_URL=api, PREFECT_HOME=str(work / "prefect"),
                   AWS_ACCESS_KEY_ID=bucket.access_key, AWS_SECRET_ACCESS_KEY=bucket.secret_key, AWS_REGION="auto")
        # A bucket's ETag style is learned by its first multipart stage (then one MD5 per file, not two).
        warm = work / "warm-up"
        warm.mkdir()
        (warm / "config.json").write_text("{}")
        (warm / "weights.safetensors").write_bytes(os.urandom(51 * MiB))
        timed([sys.executable, "-m", "modelferry.flows", "stage", str(warm), "--name", "bench/warm-up"],
              {**env, "MODELFERRY_CACHE": str(work / "cache-warm"), "HF_HOME": str(work / "hf-warm")})
        for r in range(args.rounds):
            wall, cpu, _ = timed([processes.which("s5cmd"), "--endpoint-url", bucket.endpoint, "cp",
                                  f"{work / 'ckpt'}/*", f"s3://bench/raw-{r}/"], env)
            results["s5cmd cp (baseline)"].append((wall, cpu))
            # What any ETag proof costs here at least: rclone computes an object's MD5 when first asked.
            list_wall, list_cpu, _ = timed([sys.executable, "-c", LISTING, "bench", f"raw-{r}/"], env)
            results.setdefault("s5cmd cp + bucket ETags (floor)", []).append((wall + list_wall, cpu + list_cpu))
            shutil.rmtree(bucket.root / "bench" / f"raw-{r}", ignore_errors=True)  # keep the disk from filling
            wall, cpu, proc = timed([sys.executable, "-m", "modelferry.flows", "stage", str(work / "ckpt"), "--name",
                                     f"bench/run-{r}", "--json"], {**env, "MODELFERRY_CACHE": str(work / f"cache-{r}"), "HF_HOME": str(work / f"hf-{r}")})
            start_s, start_cpu, work_s = stage_report(proc.stderr)
            results["modelferry stage"].append((work_s, cpu - start_cpu))
            results.setdefault("modelferry stage, incl. start-up", []).append((wall, cpu))
            startup.append((start_s, start_cpu))
            shutil.rmtree(bucket.root / "bench" / "models" / "bench" / f"run-{r}", ignore_errors=True)
            shutil.rmtree(work / f"cache-{r}", ignore_errors=True)
            wall, cpu, _ = timed([sys.executable, "-c", BOTO3, str(work / "ckpt"), "bench", f"boto3-{r}/"], env)
            results["boto3 upload_file"].append((wall, cpu))
            shutil.rmtree(bucket.root / "bench" / f"boto3-{r}", ignore_errors=True)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    base = statistics.median(w for w, _ in results["s5cmd cp (baseline)"])
    base_cpu = statistics.median(c for _, c in results["s5cmd cp (baseline)"])
    gb = total / 1e9
    print(f"\n{total / 2**30:.2f} GiB in {args.gib} shards + 51 small files, loopback rclone, median of {args.rounds} interleaved rounds")
    print(f"{'method':40s} {'seconds':>8s} {'MB/s':>7s} {'x s5cmd':>8s} {'CPU s/GB':>9s}")
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"{name:40s} {wall:8.2f} {total / wall / 1e6:7.0f} {base / wall:8.2f} {cpu / gb:9.2f}")
    ours = statistics.median(c for _, c in results["modelferry stage"]) / gb
    budget = (base_cpu + sha_cpu) / gb
    print(f"\norchestration start-up (median): {statistics.median(s for s, _ in startup):.2f} s, "
          f"{statistics.median(c for _, c in startup):.2f} CPU-s (Prefect API reused); not in 'modelferry stage'")
    print(f"client CPU: modelferry {ours:.2f} s/GB vs s5cmd + one sha256 pass {budget:.2f} s/GB "
          f"(sha256 alone {sha_cpu / gb:.2f}): ratio {ours / budget:.2f} (goal <= 1.1)")
    ours_wall = statistics.median(w for w, _ in results["modelferry stage"])
    floor_wall = statistics.median(w for w, _ in results["s5cmd cp + bucket ETags (floor)"])
    floor_cpu = (base_cpu + sha_cpu + md5_cpu) / gb
    print(f"throughput: modelferry stage (work) / s5cmd = {base / ours_wall:.2f} (goal >= 0.85)")
    print(f"\nThe floor of an ETag-proven stage here: s5cmd + one sha256 + one MD5 pass = {floor_cpu:.2f} CPU-s/GB "
          f"(MD5 alone {md5_cpu / gb:.2f}); modelferry / floor = {ours / floor_cpu:.2f}")
    print(f"and s5cmd cp + the listing that makes the bucket compute its ETags = {floor_wall:.2f} s; "
          f"that / modelferry stage = {floor_wall / ours_wall:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
