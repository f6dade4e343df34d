"""The deployments in prefect.yaml, applied with `prefect deploy --all` to a real Prefect server and
run by a real process worker, the way users run them. The run of `stage-and-launch/default`, with
real vLLM, is the shared vLLM session's (test_real_vllm.py)."""

from __future__ import annotations

import json

import yaml

from modelferry.tasks.offline import embedded
from modelferry.tasks.records import catalog
from tests.helpers import artifacts, flow_run_id, run_deployment


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
