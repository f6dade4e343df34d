"""Ctrl-C during `launch` on the local target (issue 13, item 1, launch side): real vLLM is starting
(API server and engine core up), a terminal's SIGINT reaches the command's process group, and the
command stops within seconds with one line, vLLM's whole process tree and the node's disk gone.
A SIGKILL of the command (issue 17: nothing of ours runs after it) ends the node all the same: its
job runner sees the command gone. The other half, a node started with --keep outliving its
command, is node B of the shared vLLM session (test_real_vllm.py)."""

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


def gone(node: list[procs.Proc], within: float) -> list[procs.Proc]:
    """[] once all of `node` has died (SIGKILLed processes take a moment to exit), else who is left."""
    deadline = time.monotonic() + within
    while (left := procs.living(node)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.parametrize("how", ["ctrl-c", "sigkill"])
def test_interrupted_launch_ends_its_whole_tree_while_vllm_starts(cli, env, tmp_path, how):
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
                logs = sorted((launches / record["cluster"]).glob("job-*.log"))
                log = logs[-1].read_text(errors="replace") if logs else ""
            time.sleep(0.5)
        assert record and record["pid"] and "EngineCore" in log, "vLLM's engine core never started"
        node = procs.group(record["pid"]) + procs.tree(record["pid"])  # the runner, bash, vLLM's processes
        assert any("vllm" in p.cmdline.lower() for p in node), node

        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        else:
            os.kill(proc.pid, signal.SIGKILL)  # kill -9, the OOM killer: no handler, no finally
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if how == "ctrl-c":
        assert proc.returncode == 130, err[-3000:]
        assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err[-3000:]
        assert took < 30, took
    else:
        assert proc.returncode == -signal.SIGKILL
    assert gone(node, within=15) == [], "vLLM's processes outlived the command"
    deadline = time.monotonic() + 10  # after a SIGKILL the runner removes them once its tree is gone
    while (left := sorted(p.name for p in launches.iterdir() if p.name != "vllm-assets")) and time.monotonic() < deadline:
        time.sleep(0.2)  # vllm-assets: shared by nodes, a cache
    assert left == [], (left, err[-2000:])  # the node's disk and its record went with it


def test_a_start_that_fails_in_vllms_engine_core_is_reported_by_its_cause(cli, env):
    """vLLM's engine core refuses a context one request can't hold in its KV cache
    (v1/core/kv_cache_utils.py 1030-1040), then its API server raises a wrapper pointing back at it
    ("Engine core initialization failed. See root cause above.", v1/engine/utils.py 1431-1434). Eight
    blocks of KV cache (--num-gpu-blocks-override: a GPU with less free memory than the fit
    assumed) can't hold 4,096 tokens; eager, so that vLLM gets there without compiling first. The
    node program's last line and `launch` name the cause. The job, run through SkyPilot's own job
    runner (log_lib), ends when vLLM does (nothing else holds its output), so launch reports it at
    once instead of waiting out --ready-timeout, and nothing of the node is left."""
    assert cli("stage", LLAMA).rc == 0
    t0 = time.monotonic()
    run = cli("launch", LLAMA, "--target", "local", "--max-model-len", "4096",
              "--extra-vllm-args=--num-gpu-blocks-override 8 --enforce-eager", "--ready-timeout", "300")
    took = time.monotonic() - t0
    assert run.rc == 1, run
    said = run.err.strip().splitlines()[-1]
    assert "is FAILED before serving: ValueError: To serve at least one request with the model's max seq len (4096)" \
        in said and "See root cause above" not in said, run.err[-3000:]
    assert took < 200, f"{took:.0f} s: the job outlived vLLM"
    assert list((Path(env["MODELFERRY_CACHE"]) / "launches").glob("*.json")) == []  # torn down
    assert procs.under(Path(env["MODELFERRY_CACHE"])) == []
