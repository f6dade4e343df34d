"""Issue 13, as a new user and a reliability engineer would meet it, against the real local parts:
Ctrl-C and SIGTERM, damaged bucket state, refusals before any write, time to error on a dead
endpoint, Prefect's start-up, the lock's takeover race, and what the terminal shows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelferry.tasks import catalog, embedded, processes
from modelferry.tasks import settings as config
from modelferry.tasks.bucket import Bucket
from tests import standins
from tests.conftest import TINY, steps_by_name
from tests.test_faults import model_dir, slow_bucket, start_stage, wait_for_line  # noqa: F401 - fixture
from tests.test_stage import make_local_model


def tree(pid: int) -> dict[int, str]:
    """The processes `pid` started (children in sessions of their own included), pid -> command line."""
    found, todo = {}, [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            for kid in kids:
                try:
                    found[kid] = Path(f"/proc/{kid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                todo.append(kid)
    return found


def alive(pid: int, cmdline: str) -> bool:
    """Still running (not a zombie) as the same command."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        now = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return state != "Z" and now == cmdline


# --- 1. Ctrl-C and SIGTERM ---------------------------------------------------------------------

@pytest.mark.parametrize("how,temporary_server", [
    ("ctrl-c", True),  # SIGINT to the whole process group, as a terminal sends it
    ("sigint-main", False),  # SIGINT to the main process alone
    ("sigterm", True),
    ("ctrl-c-twice", False),
])
def test_interrupted_stage_stops_at_once_and_leaves_nothing_running(env, slow_bucket, tmp_path, how, temporary_server):
    bucket, _, _ = slow_bucket
    model, _ = model_dir(tmp_path / "m")
    e = {**env, **bucket.env()}
    if temporary_server:
        e.pop("PREFECT_API_URL")
        e["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    proc = start_stage(e, str(model), "--name", "acme/interrupted", "--allow-unloadable")
    try:
        wait_for_line(proc, "upload 1/5", timeout=240)
        started = tree(proc.pid)
        assert any("s5cmd" in c for c in started.values()), started
        assert not temporary_server or any("uvicorn" in c for c in started.values()), started
        t = time.monotonic()
        if how == "sigint-main":
            os.kill(proc.pid, signal.SIGINT)
        elif how == "sigterm":
            os.kill(proc.pid, signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
            if how == "ctrl-c-twice":
                time.sleep(0.3)
                os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - t
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == (143 if how == "sigterm" else 130), err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted", err[-3000:]
    assert err.count("interrupted") == 1 and "Traceback" not in err and "Error logging to API" not in err, err[-3000:]
    assert took < (5 if how == "ctrl-c-twice" else 20), (took, err[-2000:])
    time.sleep(0.5)
    left = {pid: c for pid, c in started.items() if alive(pid, c)}
    assert not left, (left, err[-3000:])
    s3 = Bucket(config.load(bucket.env()))
    assert s3.listing("manifests/acme/interrupted/") == {}, "an interrupted run published something"
    if how != "ctrl-c-twice":  # a forced exit can't release it; a re-run on this host takes it over at once
        assert s3.listing("locks/acme/interrupted/") == {}, "the lock was not released"
