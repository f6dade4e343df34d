"""What happens when things break mid-way, against the real stand-ins: killed runs, a bucket that
restarts, a Hub that goes away, a full disk, a server that never gets ready."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from modelferry.tasks.clients import processes
from modelferry.tasks.offline import embedded
from modelferry.tasks.records import catalog
from modelferry.tasks import settings as config
from modelferry.tasks.clients.bucket import Bucket
from modelferry.tasks.records.lock import Lock
from tests import procs
from tests.helpers import LLAMA, MiB, TINY, make_local_model, model_dir, start_stage, steps_by_name, wait_for_line

def test_sigkill_mid_upload_then_rerun_resumes(cli, env, slow_bucket, tmp_path):
    bucket, _, _ = slow_bucket
    model, total = model_dir(tmp_path / "m")
    e = {**env, **bucket.env()}
    proc = start_stage(e, str(model), "--name", "acme/killed", "--allow-unloadable")
    wait_for_line(proc, "upload 3/5")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    s3 = Bucket(config.load(bucket.env()))
    assert s3.listing("manifests/acme/killed/") == {}, "a killed run published something"
    assert cli("list", "--json", extra_env=bucket.env()).json() == []

    rerun = cli("stage", str(model), "--name", "acme/killed", "--allow-unloadable", "--json", extra_env=bucket.env())
    assert rerun.rc == 0, rerun
    up = steps_by_name(rerun.json())["upload"]
    assert 0 < up["bytes"] < total and up["files"] < 5, (rerun.json(), rerun.err[-3000:])  # only what the killed run had not finished
    assert cli("verify", "acme/killed", "--deep", extra_env=bucket.env()).rc == 0


def test_bucket_restart_mid_upload_is_retried(cli, env, slow_bucket, tmp_path):
    bucket, port, args = slow_bucket
    model, _ = model_dir(tmp_path / "m")
    proc = start_stage({**env, **bucket.env()}, str(model), "--name", "acme/bumpy", "--allow-unloadable", "--json")
    wait_for_line(proc, "upload 1/5")
    processes.stop(bucket.proc, grace=0.1)  # the connection drops mid-transfer
    time.sleep(1)
    with embedded.rclone_bucket(bucket.root, bucket.bucket, bucket.access_key, bucket.secret_key, port, args):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        assert cli("verify", "acme/bumpy", "--deep", extra_env=bucket.env()).rc == 0


def test_hub_going_away_mid_download_fails_clearly_without_publishing(cli, env, mirror, s3, tmp_path):
    repo = "acme/vanishing"
    embedded.commit_files(mirror, repo, embedded.tiny_model_files())
    with embedded.olah_mirror(mirror, tmp_path / "olah") as hub:
        proc = start_stage({**env, "HF_ENDPOINT": hub}, repo, "--json")
        wait_for_line(proc, "download 1/")
    # leaving the `with` stopped olah while the download was running
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    import json

    row = json.loads(out)[-1]
    assert row["step"] == "download" and row["status"] == "failed" and row["attempts"] == 4, (row, err[-2000:])
    assert ("cannot reach the Hub" in err or "lost the connection to the Hub" in err) and "Traceback" not in err
    # Files verified before the Hub went away may be uploaded (a re-run won't send them again); none
    # is published.
    assert s3.listing(f"manifests/{repo}/") == {}
    assert repo not in {m["name"] for m in catalog.list_models(s3)}


def test_readiness_timeout_tears_down(cli, env, s3):
    assert cli("stage", LLAMA).rc == 0
    run = cli("launch", LLAMA, "--target", "local", "--ready-timeout", "0.3")
    assert run.rc == 1 and "did not answer /health within" in run.err, run
    assert procs.under(Path(env["MODELFERRY_CACHE"])) == []  # vLLM is stopped while still importing


def test_deleted_object_is_named_and_restored(cli, s3, tmp_path):
    model = make_local_model(tmp_path / "m")
    assert cli("stage", str(model), "--name", "acme/holey").rc == 0
    rev = catalog.current_revision(s3, "acme/holey")
    s3.delete([f"models/acme/holey/{rev}/config.json"])
    run = cli("verify", "acme/holey")
    assert run.rc == 1 and "config.json (missing)" in run.err, run
    assert cli("stage", str(model), "--name", "acme/holey").rc == 0
    assert cli("verify", "acme/holey").rc == 0


@pytest.mark.parametrize("setup,message", [
    (lambda d: None, "is empty"),
    (lambda d: (d / "escape").symlink_to("/etc/hostname"), "links outside"),
])
def test_bad_local_directories(cli, s3, tmp_path, setup, message):
    d = tmp_path / "src"
    d.mkdir()
    setup(d)
    run = cli("stage", str(d), "--name", "acme/bad-dir")
    assert run.rc == 1 and message in run.err, run
    assert s3.listing("models/acme/bad-dir/") == {}


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "tiny-disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_in_the_cache_is_a_clear_error(cli, s3, tiny_disk):
    run = cli("stage", TINY, "--name", "acme/no-room", extra_env={"HF_HUB_CACHE": str(tiny_disk)})
    assert run.rc == 1, run
    assert "not enough space in" in run.err and str(tiny_disk) in run.err and "HF_HUB_CACHE" in run.err
    assert s3.listing("models/acme/no-room/") == {} and s3.listing("manifests/acme/no-room/") == {}


def test_verify_during_a_stage_never_calls_it_good(cli, env, slow_bucket, tmp_path):
    bucket, _, _ = slow_bucket
    model, _ = model_dir(tmp_path / "m")
    proc = start_stage({**env, **bucket.env()}, str(model), "--name", "acme/inflight", "--allow-unloadable")
    wait_for_line(proc, "upload 1/5")
    during = cli("verify", "acme/inflight", extra_env=bucket.env())
    assert during.rc == 1 and "is not staged" in during.err, during
    proc.communicate(timeout=300)
    assert proc.returncode == 0
    assert cli("verify", "acme/inflight", extra_env=bucket.env()).rc == 0


def test_local_file_rewritten_after_resolve_is_refused(env, tmp_path, monkeypatch):
    from modelferry.tasks.staging import pipeline, resolve
    from modelferry.tasks.errors import IntegrityError
    from modelferry.tasks.staging.survey import survey

    monkeypatch.setenv("MODELFERRY_CACHE", str(tmp_path / "cache"))
    model, _ = model_dir(tmp_path / "m")
    settings = config.load(env)
    plan, _ = resolve.resolve(settings, str(model), None, [], [], "acme/rewritten", allow_unloadable=True)
    s3 = Bucket(settings)
    with Lock(s3, plan.name, plan.revision).held(wait=0):
        survey(s3, plan, replace=False)
        (model / "c.safetensors").write_bytes(os.urandom(24 * MiB))  # same size, other bytes
        with pytest.raises(IntegrityError) as caught:
            pipeline.transfer(settings, plan)
    assert caught.value.step == "local_verify"
    assert "c.safetensors (changed since resolve hashed it)" in str(caught.value)
    assert caught.value.bad_files == ["c.safetensors"]
    assert "c.safetensors" not in {k.rsplit("/", 1)[-1] for k in s3.listing("models/acme/rewritten/")}
    assert s3.listing("manifests/acme/rewritten/") == {}
