"""Time to a verified stage through a throttling bucket, against the same stage with no throttling.

Data: a local checkpoint of SHARDS x MIB MiB safetensors-named shards (seeded bytes) and a config.
Bucket: `rclone serve s3` on loopback (started here), reached three ways, interleaved per round:
directly; through the faulty proxy of `bench/throttle.py` answering nothing itself (the proxy's own
cost: the named baseline); and through the same proxy answering the first try of every N-th write
(creates, parts, completes, puts) with 503 SlowDown / 429 / 500 in turn, as a busy S3 or R2 bucket
does. Each stage is a fresh name and cache, verified (`verify --deep`) before it counts. Prints the
stage's own work time (orchestration start-up excluded), the requests throttled, whether a step was
retried (a file started over), and the ratio to the baseline.

    .venv/bin/python bench/stage_under_load.py [--shards 3] [--mib 512] [--every 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.stage_throughput import in_scratch_dir, stage_report  # noqa: E402
from bench.throttle import Faulty, every_nth_first_try  # noqa: E402
from modelferry.tasks.offline import embedded  # noqa: E402

MiB = 2**20
WRITES = {"create", "part", "complete", "copy-or-put"}


def make_checkpoint(root: Path, shards: int, mib: int, seed: int = 17) -> int:
    root.mkdir(parents=True)
    block = random.Random(seed).randbytes(16 * MiB)
    for i in range(shards):
        with open(root / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", "wb") as f:
            for j in range(mib // 16):  # each 16 MiB block salted, so no two parts are alike
                f.write(j.to_bytes(8, "little") + i.to_bytes(8, "little") + block[16:])
    (root / "config.json").write_text('{"architectures": ["Bench"]}')
    return sum(p.stat().st_size for p in root.iterdir())


def resalt(ckpt: Path, n: int) -> None:
    """Make every shard's bytes new (8 bytes of each), in place: the same bytes staged again under
    another name would be copied inside the bucket, not sent."""
    for shard in sorted(ckpt.glob("*.safetensors")):
        with open(shard, "r+b") as f:
            f.seek(16 * MiB + 8)
            f.write(n.to_bytes(8, "little"))


def stage(ckpt: Path, name: str, env: dict) -> tuple[float, int]:
    """(work seconds, upload step attempts) of one verified `modelferry stage`."""
    cmd = [sys.executable, "-m", "modelferry.flows"]
    proc = subprocess.run([*cmd, "stage", str(ckpt), "--name", name, "--json"], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"stage {name} failed: {proc.stderr[-2000:]}")
    attempts = next(r["attempts"] for r in json.loads(proc.stdout) if r["step"] == "upload")
    deep = subprocess.run([*cmd, "verify", name, "--deep"], env=env, capture_output=True, text=True)
    if deep.returncode:
        raise SystemExit(f"verify --deep {name} failed: {deep.stderr[-2000:]}")
    return stage_report(proc.stderr)[2], attempts


def run(work: Path, args) -> int:
    total = make_checkpoint(work / "ckpt", args.shards, args.mib)
    times: dict[str, list[float]] = {"direct": [], "proxy, no faults (baseline)": [], "proxy, throttling": []}
    throttled, retried = [], 0
    with embedded.rclone_bucket(work / "data", "bench", "bench-access-1", "bench-secret-1") as bucket, \
            embedded.prefect_server(work / "prefect") as api:
        env = dict(os.environ, **bucket.env(), PREFECT_API_URL=api, PREFECT_HOME=str(work / "prefect"))
        port = int(bucket.endpoint.rsplit(":", 1)[1])
        for r in range(args.rounds):
            for how in times:
                rule = every_nth_first_try(args.every, kinds=WRITES) if how == "proxy, throttling" else (lambda *_: None)
                run_env = {**env, "MODELFERRY_CACHE": str(work / f"cache-{r}-{len(times[how])}-{how[:5]}")}
                resalt(work / "ckpt", r * len(times) + list(times).index(how))
                with Faulty(port, rule) as proxy:
                    if how != "direct":
                        run_env["R2_ENDPOINT"] = proxy.url
                    t = time.perf_counter()
                    work_s, attempts = stage(work / "ckpt", f"bench/load-{r}-{how[:5].strip(',')}", run_env)
                    wall = time.perf_counter() - t
                    errors = [e for e in proxy.log if e[3] in (429, 500, 503)]
                times[how].append(work_s)
                retried += attempts - 1
                if how == "proxy, throttling":
                    throttled.append((len(errors), sum(1 for e in proxy.log if e[0] in WRITES)))
                print(f"round {r + 1} {how}: work {work_s:.2f} s (wall {wall:.1f} s), upload attempts {attempts}"
                      + (f", throttled {len(errors)} requests" if errors else ""), file=sys.stderr, flush=True)
    base = statistics.median(times["proxy, no faults (baseline)"])
    print(f"\n{total / 1e9:.2f} GB in {args.shards} shards of {args.mib} MiB, loopback rclone, "
          f"median of {args.rounds} interleaved rounds; every {args.every}th write's first try throttled")
    print(f"{'bucket reached':32s} {'work s':>8s} {'MB/s':>7s} {'x baseline':>11s}")
    for how, runs in times.items():
        med = statistics.median(runs)
        print(f"{how:32s} {med:8.2f} {total / med / 1e6:7.0f} {med / base:11.2f}")
    n_err, n_writes = throttled[-1]
    print(f"throttled per stage: {n_err} of {n_writes} writes (SlowDown/429/500 in turn); "
          f"step retries (a file started over) in all stages: {retried}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--mib", type=int, default=512, help="size of each shard (a multiple of 16)")
    ap.add_argument("--every", type=int, default=10, help="throttle the first try of every N-th write")
    ap.add_argument("--rounds", type=int, default=2)
    return in_scratch_dir("mf-bench-load-", run, ap.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
