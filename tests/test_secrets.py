"""Secrets never land in what we produce. The demo (three real vLLM starts) runs with distinctive
key, secret, HF token and API key, and its output and every file it wrote are scanned for them. The
scan of everything the whole suite wrote runs when the session ends, whatever the test order
(`no_secret_in_what_the_session_wrote` in conftest.py); the last test here shows that scan finds a
secret where there is one."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest

from tests.helpers import DEMO_SECRETS, ROOT, secret_findings


@pytest.mark.services
@pytest.mark.real_vllm
@pytest.mark.timeout(1200)
def test_the_demo_leaks_no_secret(tmp_path):
    env = dict(os.environ, MODELFERRY_DEMO_DIR=str(tmp_path / "demo"), **DEMO_SECRETS, PREFECT_API_URL="")
    run = subprocess.run([sys.executable, "-m", "modelferry.flows.demo"], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=1100)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "demo done" in run.stdout and "prefetch" in run.stdout
    assert [name for name, value in DEMO_SECRETS.items() if value in run.stdout + run.stderr] == []
    produced = tmp_path / "demo"
    assert list(produced.rglob("phases.png")) and list(produced.rglob("*.db"))
    import pandas as pd

    rows = pd.concat([pd.read_parquet(f) for f in (produced / "results").rglob("*.parquet")])
    assert sorted(zip(rows["strategy"], rows["kind"])) == [("prefetch", "cold"), ("stream", "cold"), ("stream", "warm")]
    assert set(rows["vllm"]) == {"0.32.0"} and (rows["engine_s"] > 0).all()  # real vLLM, both strategies
    assert secret_findings([produced], DEMO_SECRETS) == []


def test_the_scan_finds_a_planted_secret_and_names_it_without_its_value(tmp_path):
    planted = {"PLANTED_KEY": "mf-planted-" + os.urandom(4).hex()}  # in no other secret list: the session scan ignores it
    (tmp_path / "clean.log").write_text("nothing here\n")
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    with sqlite3.connect(deep / "store.db") as db:  # as Prefect keeps logs and parameters
        db.execute("create table logs (message text)")
        db.execute("insert into logs values (?)", (f"connecting with {planted['PLANTED_KEY']}",))
    (tmp_path / "link.db").symlink_to(deep / "store.db")  # followed links would report it twice
    assert secret_findings([tmp_path], planted) == [f"{deep / 'store.db'} holds PLANTED_KEY"]
    assert secret_findings([tmp_path / "missing"], planted) == []
