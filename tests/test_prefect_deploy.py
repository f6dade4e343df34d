"""The deployments in prefect.yaml, applied with `prefect deploy --all` to a real Prefect server and
run by a real process worker, the way users run them."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from modelferry.tasks.offline import embedded
from modelferry.tasks.records import catalog
from tests.helpers import ACCESS_KEY, LLAMA, SECRET_KEY, flow_run_id, run_deployment

ROOT = Path(__file__).resolve().parent.parent


def artifacts(run_id: str) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))

    return {a.key: a for a in asyncio.run(read()) if a.key}


@pytest.mark.timeout(1200)  # may be the first to ask for the shared vLLM session: three starts
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
    everything = " ".join(str(a.data) for a in arts.values()) + out.stdout
    assert SECRET_KEY not in everything and ACCESS_KEY not in everything


def test_nightly_refresh_has_its_schedule(worker):
    _, prefect, _ = worker
    out = prefect("deployment", "inspect", "model-refresh/nightly")
    assert "0 2 * * *" in out.stdout and "UTC" in out.stdout


def test_refresh_stages_only_changes_then_is_a_noop(worker, mirror, s3, tmp_path):
    _, prefect, _ = worker
    repo = "acme/refresh-me"
    files = {k: v.read_bytes() for k, v in embedded.tiny_model_files().items()}
    first = embedded.commit_files(mirror, repo, files, "v1")
    watch = tmp_path / "watch.yaml"
    watch.write_text(yaml.safe_dump({"models": [{"model": repo, "follow": "main", "keep": 2}]}))

    def refresh() -> dict:
        out = run_deployment(prefect, "model-refresh/nightly", f"watchlist={watch}")
        assert "Completed" in out.stdout, out.stdout[-2000:]
        rows = json.loads(artifacts(flow_run_id(out.stdout))["model-refresh"].data)
        return rows[0]

    row = refresh()
    assert row["status"] == "staged" and row["revision"] == first
    assert row["bytes_sent"] == sum(len(b) for b in files.values())
    assert catalog.current_revision(s3, repo) == first

    changed = b'{"architectures": ["BertModel"], "refreshed": true}'
    second = embedded.commit_files(mirror, repo, {"config.json": changed}, "v2")
    row = refresh()
    assert row["status"] == "staged" and row["revision"] == second
    assert row["bytes_sent"] == len(changed) and row["files_copied"] == len(files) - 1
    assert catalog.current_revision(s3, repo) == second
    assert catalog.read_manifest(s3, repo, first) is not None  # keep: 2
    assert s3.get_bytes(f"models/{repo}/{second}/config.json") == changed

    row = refresh()
    assert row["status"] == "unchanged" and row["bytes_sent"] == 0


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = ROOT / "test-output"


def chromium(url: str, *mode: str, user_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={user_dir}", "--virtual-time-budget=20000", "--window-size=1400,1000",
                           *mode, url], capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)")
@pytest.mark.timeout(1200)
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
