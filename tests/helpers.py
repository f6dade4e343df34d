"""The suite's constants and helpers, imported by tests and by conftest.py (which holds only
fixtures and hooks)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

from modelferry.tasks.offline import tiny_llama

ACCESS_KEY = "mf-test-access-7f3a1c"
SECRET_KEY = "mf-test-secret-9c1e55d2"
HF_TOKEN = "hf_mftesttoken4b8e2a"
API_KEY = "mf-api-key-offline-1"  # the kept vLLM node's key
DRY_RUN_API_KEY = "mf-api-key-5e7d"  # the VLLM_API_KEY of the dry runs that print a task
# Every secret the suite hands to what it runs, by a name a finding may print (the value it may not).
SECRETS = {"ACCESS_KEY": ACCESS_KEY, "SECRET_KEY": SECRET_KEY, "HF_TOKEN": HF_TOKEN, "API_KEY": API_KEY,
           "DRY_RUN_API_KEY": DRY_RUN_API_KEY}
BUCKET = "mf-test"
TINY = "sentence-transformers/all-MiniLM-L6-v2"  # staging tests: real files, a 2-part safetensors
LLAMA = tiny_llama.REPO  # everything that launches: real vLLM serves it
ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20


class Run:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.rc, self.out, self.err = proc.returncode, proc.stdout, proc.stderr

    def json(self):
        return json.loads(self.out)

    def __repr__(self):
        return f"<rc={self.rc}\nstdout:\n{self.out[-3000:]}\nstderr:\n{self.err[-3000:]}>"


def steps_by_name(rows: list[dict]) -> dict[str, dict]:
    return {r["step"]: r for r in rows}


def run_deployment(prefect, name: str, *params: str) -> subprocess.CompletedProcess:
    args = ["deployment", "run", name, "--watch", "--watch-timeout", "900"]
    for p in params:
        args += ["-p", p]
    return prefect(*args, timeout=960)


def artifacts(run_id: str) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))

    return {a.key: a for a in asyncio.run(read()) if a.key}


def flow_run_id(output: str) -> str:
    for line in output.splitlines():
        if "UUID:" in line:
            return line.split("UUID:")[1].strip()
    raise AssertionError(f"no flow run id in: {output[-1000:]}")


@dataclass
class VllmSession:
    deployed: subprocess.CompletedProcess  # `prefect deployment run stage-and-launch/default`: node A cold, then warm
    results_a: Path
    kept: Run  # `modelferry launch --keep`: node B, fresh, left running for the `down` test
    results_b: Path
    env: dict
    idle: IdleWatch  # node C, kept with a one-minute idle limit, watched while the other tests run


def complete(url: str, prompt: str, max_tokens: int = 4) -> dict:
    """One completion from a node of the suite's (its API key), as a client sends it."""
    import urllib.request

    req = urllib.request.Request(url + "/v1/completions", method="POST",
                                 data=json.dumps({"model": LLAMA, "prompt": prompt, "max_tokens": max_tokens}).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


@dataclass
class IdleWatch:
    """`launch --keep --idle-minutes 1 --strategy STRATEGY` once `staged()` says the bucket has what
    it needs, then a request every 15 s for `ask_s`, then none: what a thread saw of it, so that its
    minutes of waiting pass while other tests run."""

    env: dict
    staged: Callable[[], bool]
    cwd: Path  # launch writes its results under ./results
    strategy: str
    ask_s: float = 80
    launched: Run | None = None
    answered: list[str] = None  # each request's completion text
    asked_s: float = 0  # from the launch's return to the last answer
    gone_s: float | None = None  # from the last answer until the node's record and disk were gone
    log: str = ""  # the node's job log, as last read
    node: list = None  # the node's processes, once it served
    error: str | None = None

    def __post_init__(self):
        import threading

        self.answered, self.node = [], []
        self.done = threading.Event()
        threading.Thread(target=self._watch, daemon=True, name="idle-node").start()

    def _watch(self) -> None:
        from tests import procs

        try:
            deadline = time.monotonic() + 600
            while not self.staged():
                if time.monotonic() > deadline:
                    raise TimeoutError("the bucket was not ready for node C within 600 s")
                time.sleep(1)
            self.launched = Run(subprocess.run(
                [sys.executable, "-m", "modelferry.flows", "launch", LLAMA, "--keep", "--idle-minutes", "1",
                 "--strategy", self.strategy, "--json", "--ready-timeout", "300"], env=self.env, cwd=self.cwd,
                capture_output=True, text=True, timeout=600))
            if self.launched.rc:
                return
            launches = Path(self.env["MODELFERRY_CACHE"]) / "launches"
            (record_file,) = launches.glob("*.json")
            record = json.loads(record_file.read_text())
            self.node = procs.group(record["pid"]) + procs.tree(record["pid"])
            job_log, start = launches / record["cluster"] / "job-1.log", time.monotonic()
            while time.monotonic() - start < self.ask_s:
                self.answered.append(complete(record["url"], "Still there?")["choices"][0]["text"])
                time.sleep(15)
            self.answered.append(complete(record["url"], "Last one")["choices"][0]["text"])
            last = time.monotonic()
            self.asked_s = last - start
            while (record_file.exists() or (launches / record["cluster"]).exists()) and time.monotonic() - last < 180:
                self.log = job_log.read_text(errors="replace") if job_log.exists() else self.log
                time.sleep(1)
            if not record_file.exists():
                self.gone_s = time.monotonic() - last
        except Exception as exc:  # noqa: BLE001 - the test reports it
            self.error = repr(exc)
        finally:
            self.done.set()


def write_files(root: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    """Each file of `files` (path relative to `root`: its bytes) written under `root`."""
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def make_local_model(root, extra: dict | None = None):
    import numpy as np

    (root / "nested dir" / "deeper").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(tiny_llama.to_safetensors({
        "w": ("F32", (1000,), np.arange(1000, dtype="<f4").tobytes()),
        "b": ("F32", (3, 3), np.ones((3, 3), "<f4").tobytes())}))
    (root / "config.json").write_text(json.dumps({"architectures": ["Toy"], "hidden_size": 3}))
    (root / "tokenizer.json").write_text("{" + '"vocab": "abc", ' * 200 + '"end": 1}')
    (root / "nested dir" / "deeper" / "notes with spaces.txt").write_text("hello")
    (root / "empty.txt").write_bytes(b"")
    write_files(root, extra or {})
    return root


def model_dir(root: Path) -> tuple[Path, int]:
    root.mkdir(parents=True)
    # c and d outgrow loopback socket buffers: a killed client can't have handed them over whole.
    sizes = {"config.json": 0, "a.safetensors": 1, "b.safetensors": 2, "c.safetensors": 24, "d.safetensors": 24}
    for name, mib in sizes.items():
        (root / name).write_bytes(os.urandom(mib * MiB) if mib else b"{}")
    return root, sum(p.stat().st_size for p in root.iterdir())


def start_stage(env, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "modelferry.flows", "stage", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 120) -> list[str]:
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"never saw {needle!r}: {''.join(seen)[-2000:]}")


def secret_findings(roots: list[Path], secrets: dict[str, str]) -> list[str]:
    """'FILE holds NAME' for each secret found in a file under `roots` (databases, logs, tables and
    plots included: any bytes), never the secret itself."""
    found = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if not path.is_file() or path.is_symlink():
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            found += [f"{path} holds {name}" for name, value in secrets.items() if value.encode() in data]
    return found


def start_rows(*starts: tuple[str, str, str, float, float], model: str = "acme/m"):
    """Bench rows (StartRow records) of (target, strategy, kind, total_s, weights_s)."""
    import dataclasses

    import pandas as pd

    from modelferry.tasks.measure.results import StartRow

    def row(i, target, strategy, kind, total, weights):
        blank = {f.name: None for f in dataclasses.fields(StartRow)}
        gpu = {"gpu": "L4", "gpus": 1, "instance_type": "g6.xlarge", "cloud": "aws", "region": "us-east-1",
               "spot": True} if target == "sky" else {"gpu": "cpu", "gpus": 0, "instance_type": "local",
                                                      "cloud": "local", "region": "local", "spot": False}
        return {**blank, "model": model, "target": target, "strategy": strategy, "kind": kind, "run": 1,
                "total_s": total, "weights_s": weights, "started_at": f"2026-12-06T10:00:{i:02d}Z", **gpu}

    return pd.DataFrame([row(i, *s) for i, s in enumerate(starts)])
