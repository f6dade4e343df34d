"""Unchanged re-stage of a 100-file model: bytes sent and wall time after start-up.

Baseline: the first stage of the same model in the same run. Stages a local 100-file checkpoint
into a loopback rclone bucket (Prefect API reused, so orchestration start-up is reported apart),
then re-stages it unchanged ROUNDS times.

    .venv/bin/python bench/restage_unchanged.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.stage_throughput import stage_report  # noqa: E402
from modelferry.tasks.offline import embedded  # noqa: E402


def stage(env: dict, ckpt: Path) -> tuple[float, float, int]:
    """(wall, work, bytes sent): work is the flow's own report, orchestration start-up excluded."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "modelferry.flows", "stage", str(ckpt), "--name", "bench/hundred", "--json"],
                         env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    rows = json.loads(out.stdout)
    sent = sum(r["bytes"] for r in rows if r["step"] == "upload")
    return wall, stage_report(out.stderr)[2], sent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mf-restage-"))
    ckpt = work / "ckpt"
    (ckpt / "shards").mkdir(parents=True)
    for i in range(98):
        (ckpt / "shards" / f"part-{i:03d}.safetensors").write_bytes(os.urandom(256 * 1024))
    (ckpt / "config.json").write_text("{}")
    (ckpt / "tokenizer.json").write_bytes(os.urandom(2 * 2**20))
    with embedded.rclone_bucket(work / "data", "bench", "bench-access-2", "bench-secret-2") as bucket, \
            embedded.prefect_server(work / "prefect") as api:
        env = dict(os.environ, **bucket.env(), PREFECT_API_URL=api, MODELFERRY_CACHE=str(work / "cache"),
                   HF_HOME=str(work / "hf"))
        first = stage(env, ckpt)
        again = [stage(env, ckpt) for _ in range(args.rounds)]
    print(f"100 files, {sum(p.stat().st_size for p in ckpt.rglob('*') if p.is_file()) / 1e6:.1f} MB, loopback rclone")
    print(f"{'run':28s} {'wall s':>7s} {'work s':>8s} {'bytes sent':>11s}")
    print(f"{'first stage (baseline)':28s} {first[0]:7.2f} {first[1]:8.2f} {first[2]:11d}")
    med = (statistics.median(a[0] for a in again), statistics.median(a[1] for a in again), max(a[2] for a in again))
    print(f"{f'unchanged re-stage (median {args.rounds})':28s} {med[0]:7.2f} {med[1]:8.2f} {med[2]:11d}")
    print(f"re-stage after start-up: {med[1]:.2f} s (goal < 2 s), {med[2]} bytes sent (goal 0); "
          f"{med[1] / first[1]:.2f}x the first stage's work")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
