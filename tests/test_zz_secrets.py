"""Secrets never land in what we produce. Runs last (file order): the demo (three real vLLM starts)
with distinctive key, secret, HF token and API key, then a scan of its output and every file it and
the whole suite wrote: results tables, job logs, plots, caches, generated tasks, and the Prefect
databases holding logs, artifacts and parameters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ACCESS_KEY, HF_TOKEN, SECRET_KEY

pytestmark = pytest.mark.services

DEMO_SECRETS = {"key": "mf-demo-access-ZQ81", "secret": "mf-demo-secret-XK42", "hf": "hf_mfdemotokenRW77",
                "api": "mf-demo-api-key-PL93"}
ROOT = Path(__file__).resolve().parent.parent


def files_holding(root: Path, needles: list[str]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            hits += [f"{path}: {n}" for n in needles if n.encode() in data]
    return hits


@pytest.mark.real_vllm
@pytest.mark.timeout(1200)
def test_the_demo_leaks_no_secret(tmp_path):
    env = dict(os.environ, MODELFERRY_DEMO_DIR=str(tmp_path / "demo"), MODELFERRY_DEMO_ACCESS_KEY=DEMO_SECRETS["key"],
               MODELFERRY_DEMO_SECRET_KEY=DEMO_SECRETS["secret"], HF_TOKEN=DEMO_SECRETS["hf"],
               VLLM_API_KEY=DEMO_SECRETS["api"], PREFECT_API_URL="")
    run = subprocess.run([sys.executable, "-m", "modelferry.flows.demo"], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=1100)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "demo done" in run.stdout and "prefetch" in run.stdout
    needles = list(DEMO_SECRETS.values())
    assert [n for n in needles if n in run.stdout + run.stderr] == []
    produced = tmp_path / "demo"
    assert list(produced.rglob("phases.png")) and list(produced.rglob("*.db"))
    import pandas as pd

    rows = pd.concat([pd.read_parquet(f) for f in (produced / "results").rglob("*.parquet")])
    assert sorted(zip(rows["strategy"], rows["kind"])) == [("prefetch", "cold"), ("stream", "cold"), ("stream", "warm")]
    assert set(rows["vllm"]) == {"0.32.0"} and (rows["engine_s"] > 0).all()  # real vLLM, both strategies
    assert files_holding(produced, needles) == []


def test_nothing_the_suite_wrote_holds_a_secret(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    needles = [ACCESS_KEY, SECRET_KEY, HF_TOKEN, "mf-api-key-5e7d", "mf-api-key-offline-1"]
    assert list(base.rglob("prefect.db")), "expected the suite's Prefect database to scan"
    hits = files_holding(base, needles) + files_holding(ROOT / "test-output", needles)
    assert hits == []
