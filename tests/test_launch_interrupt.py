"""Ctrl-C during `launch` on the local target (issue 13, item 1, launch side): real vLLM is starting
(API server and engine core up), a terminal's SIGINT reaches the command's process group, and the
command stops within seconds with one line, vLLM's whole process tree and the node's disk gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import procs
from tests.helpers import LLAMA

pytestmark = pytest.mark.real_vllm


def gone(pgid: int, within: float = 10) -> list[procs.Proc]:
    """[] once the group has died (SIGKILLed processes take a moment to exit), else who is left."""
    deadline = time.monotonic() + within
    while (left := procs.group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_ctrl_c_while_vllm_starts_ends_its_whole_tree(cli, env, tmp_path):
    assert cli("stage", LLAMA).rc == 0
    proc = subprocess.Popen([sys.executable, "-m", "modelferry.flows", "launch", LLAMA, "--target", "local"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    launches = Path(env["MODELFERRY_CACHE"]) / "launches"
    try:
        deadline, record, log = time.monotonic() + 240, None, ""
        while time.monotonic() < deadline and "EngineCore" not in log:
            assert proc.poll() is None, proc.communicate()
            records = list(launches.glob("*.json")) if launches.exists() else []
            if records:
                record = json.loads(records[0].read_text())
                logs = sorted((launches / record["name"]).glob("job-*.log"))
                log = logs[-1].read_text(errors="replace") if logs else ""
            time.sleep(0.5)
        assert record and record["pid"] and "EngineCore" in log, "vLLM's engine core never started"
        assert procs.group(record["pid"])

        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err[-3000:]
    assert took < 30, took
    assert gone(record["pid"]) == [], "vLLM's processes outlived the command"
    left = sorted(p.name for p in launches.iterdir() if p.name != "vllm-assets")  # shared by nodes: a cache
    assert left == [], (left, err[-2000:])  # the node's disk and its record went with it
