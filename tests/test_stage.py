"""`modelferry stage | verify | list` against the real bucket (rclone), the offline Hub (olah) and a
real Prefect server; the staged weights read back by vLLM's own loader."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest
from prefect.client.orchestration import get_client

from modelferry.tasks.offline import embedded
from modelferry.tasks.records import catalog, layout
from modelferry.tasks.launch.local_target import vllm_python
from tests.helpers import ACCESS_KEY, SECRET_KEY, TINY, make_local_model, steps_by_name

STEPS = ["resolve", "download", "local_verify", "upload", "remote_verify", "publish"]


def tiny_size() -> int:
    return sum(p.stat().st_size for p in embedded.tiny_model_files().values())


def test_stage_from_hub_then_unchanged_restage_sends_nothing(cli, bucket, s3):
    NAME = "acme/minilm-e2e"  # a prefix no other test touches
    run = cli("stage", TINY, "--name", NAME, "--json")
    assert run.rc == 0, run
    rows = run.json()
    assert [r["step"] for r in rows] == STEPS
    by = steps_by_name(rows)
    assert all(r["status"] == "completed" for r in rows), rows
    assert by["upload"]["bytes"] == tiny_size() and by["upload"]["files"] == 13
    assert by["download"]["bytes"] == tiny_size()
    assert all({"seconds", "files", "bytes", "mb_per_s", "attempts"} <= set(r) for r in rows)
    assert "upload 13/13 files" in run.err  # progress while it runs

    # Every object holds exactly the source bytes (read from rclone's own directory).
    commit = catalog.current_revision(s3, NAME)
    stored = bucket.root / bucket.bucket / "models" / NAME / commit
    for rel, src in embedded.tiny_model_files().items():
        assert hashlib.sha256((stored / rel).read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest(), rel

    manifest = catalog.read_manifest(s3, NAME, commit)
    assert manifest.schema_version == 1 and manifest.license == "apache-2.0" and manifest.gated is False
    st = {f.path: f for f in manifest.files}["model.safetensors"]
    assert st.lfs and st.sha256 == "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    # rclone keeps a whole-file MD5 as the multipart ETag; we recorded what it showed, and the
    # bucket's style is learned, so later stages hash only that MD5.
    assert st.etag == st.md5
    assert s3.get_json("modelferry/bucket.json")["multipart_etag"] == "whole-md5"

    listed = cli("list", "--json")
    assert listed.rc == 0, listed
    row = next(r for r in listed.json() if r["name"] == NAME)
    assert row["uri"] == f"s3://{bucket.bucket}/models/{NAME}/{commit}/"
    assert row["manifest"] == f"s3://{bucket.bucket}/manifests/{NAME}/revisions/{commit}.json"
    assert row["files"] == 13 and row["bytes"] == tiny_size() and row["verified"] == "ok" and row["staged_at"]

    again = cli("stage", TINY, "--name", NAME, "--json")
    assert again.rc == 0, again
    by = steps_by_name(again.json())
    assert by["upload"]["status"] == "skipped" and by["upload"]["bytes"] == 0
    assert by["download"]["bytes"] == 0 and by["publish"]["status"] == "skipped"
    assert by["remote_verify"]["status"] == "completed"

    for out in (run.out + run.err, again.out + again.err, listed.out):
        assert SECRET_KEY not in out and ACCESS_KEY not in out


def test_stage_shows_the_step_table_as_a_prefect_artifact(cli, prefect_api):
    run = cli("stage", TINY)
    assert run.rc == 0, run
    assert "remote_verify" in run.out and "upload" in run.out  # the printed table

    async def latest_table():
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
        async with get_client() as client:
            arts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["stage-steps"])),
                                               limit=50)
        return max(arts, key=lambda a: a.created)

    import asyncio

    art = asyncio.run(latest_table())
    table = json.loads(art.data) if isinstance(art.data, str) else art.data
    assert [r["step"] for r in table] == STEPS
    assert SECRET_KEY not in str(art.data)


def test_runai_streamer_streams_staged_weights(cli, bucket, s3, tmp_path):
    """vLLM's loader (in the local node's vLLM venv) reads the staged safetensors with exactly the
    environment the launcher generates."""
    assert cli("stage", TINY).rc == 0
    commit = catalog.current_revision(s3, TINY)
    from modelferry.tasks import settings as config

    cfg = config.load(bucket.env())
    env = {**config.loader_env(cfg.endpoint), **config.loader_secrets(cfg), "PATH": "/usr/bin:/bin"}
    src = embedded.tiny_model_files()["model.safetensors"]
    script = f"""
import torch
from safetensors.torch import load_file
from runai_model_streamer import SafetensorsStreamer
want = load_file({str(src)!r})
got = {{}}
with SafetensorsStreamer() as st:
    st.stream_files(["s3://{bucket.bucket}/models/{TINY}/{commit}/model.safetensors"])
    for name, t in st.get_tensors():
        got[name] = t.clone()
assert set(got) == set(want), (len(got), len(want))
assert all(torch.equal(got[k], want[k]) for k in want)
print("STREAMED", len(got))
"""
    proc = subprocess.run([vllm_python(), "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and "STREAMED" in proc.stdout, proc.stderr[-3000:]


def test_corrupted_object_is_named_by_verify_and_repaired_by_stage(cli, bucket, s3, tmp_path):
    name = "acme/corrupt-me"
    model = make_local_model(tmp_path / "m")
    assert cli("stage", str(model), "--name", name).rc == 0
    rev = catalog.current_revision(s3, name)
    key = f"models/{name}/{rev}/tokenizer.json"
    original = s3.get_bytes(key)
    s3.put_bytes(key, original[:-1] + b"X")  # same size, other bytes

    run = cli("verify", name)
    assert run.rc == 1 and "tokenizer.json" in run.err and "model.safetensors" not in run.err, run
    deep = cli("verify", name, "--deep", "--json")
    assert deep.rc == 1 and "tokenizer.json" in deep.json()["bad"], deep
    listed = {r["revision"]: r for r in cli("list", "--json").json() if r["name"] == name}
    assert listed[rev]["verified"].startswith("FAILED")

    repair = cli("stage", str(model), "--name", name, "--json")
    assert repair.rc == 0, repair
    up = steps_by_name(repair.json())["upload"]
    assert up["files"] == 1 and up["bytes"] == len(original)
    assert cli("verify", name, "--deep").rc == 0
    assert s3.get_bytes(key) == original


def test_hub_file_not_matching_its_sha256_is_refused(cli, mirror, s3):
    repo = "acme/tampered"
    files = {k: v.read_bytes() for k, v in embedded.tiny_model_files().items() if k in ("config.json", "model.safetensors")}
    bad = bytearray(files["model.safetensors"])
    bad[-100] ^= 0xFF
    embedded.commit_files(mirror, repo, files, lfs_files={"model.safetensors"}, lfs_bytes={"model.safetensors": bytes(bad)})
    run = cli("stage", repo, "--json")
    assert run.rc == 1, run
    rows = run.json()
    assert rows[-1]["step"] == "local_verify" and rows[-1]["status"] == "failed"
    assert "model.safetensors" in run.err and "sha256" in run.err
    # Each file goes up only once its own bytes matched: the good config.json may be there, the bad
    # file never is, and nothing is published.
    staged = {k.rsplit("/", 1)[-1] for k in s3.listing(f"models/{repo}/")}
    assert "model.safetensors" not in staged and staged <= {"config.json"}
    assert s3.listing(f"manifests/{repo}/") == {}


def test_interrupted_stage_resumes_sending_only_what_is_missing(cli, s3):
    repo_files = embedded.tiny_model_files()
    assert cli("stage", TINY, "--no-set-current").rc == 0
    rev = next(r["revision"] for r in catalog.list_models(s3) if r["name"] == TINY)
    # What an interrupted run leaves: some objects, no manifest.
    s3.delete([layout.manifest_key(TINY, rev), f"models/{TINY}/{rev}/vocab.txt", f"models/{TINY}/{rev}/config.json"])
    run = cli("stage", TINY, "--json")
    assert run.rc == 0, run
    by = steps_by_name(run.json())
    want = repo_files["vocab.txt"].stat().st_size + repo_files["config.json"].stat().st_size
    assert by["upload"]["files"] == 2 and by["upload"]["bytes"] == want
    assert by["publish"]["status"] == "completed"


def test_local_checkpoint_nested_spaces_empty_and_globs(cli, bucket, s3, tmp_path):
    model = make_local_model(tmp_path / "ckpt", {"optimizer.bin": b"\0" * 1000})
    missing_name = cli("stage", str(model))
    assert missing_name.rc == 2 and "--name" in missing_name.err, missing_name  # refused before Prefect starts

    run = cli("stage", str(model), "--name", "acme/local-toy", "--exclude", "*.bin", "--json")
    assert run.rc == 0, run
    row = next(r for r in cli("list", "--json").json() if r["name"] == "acme/local-toy")
    assert row["revision"].startswith("local-") and row["files"] == 5
    stored = bucket.root / bucket.bucket / "models" / "acme/local-toy" / row["revision"]
    assert (stored / "nested dir" / "deeper" / "notes with spaces.txt").read_text() == "hello"
    assert (stored / "empty.txt").stat().st_size == 0
    assert not (stored / "optimizer.bin").exists()
    assert steps_by_name(run.json())["download"]["status"] == "skipped"

    only = cli("stage", str(model), "--name", "acme/local-toy-only", "--include", "*.json", "--include", "*.safetensors", "--json")
    assert only.rc == 0, only
    assert next(r for r in cli("list", "--json").json() if r["name"] == "acme/local-toy-only")["files"] == 3

    other_globs = cli("stage", str(model), "--name", "acme/local-toy", "--exclude", "*.bin", "--exclude", "*.txt")
    assert other_globs.rc == 0  # other content -> another local revision, not a clash


@pytest.mark.parametrize("args,message", [
    (["--include", "*.gguf"], "no file of"),
    (["--exclude", "*.safetensors"], "weights are not safetensors"),
])
def test_bad_selection_is_refused_before_any_write(cli, s3, args, message):
    run = cli("stage", TINY, "--name", "acme/refused", *args)
    assert run.rc == 1 and message in run.err, run
    assert s3.listing("models/acme/refused/") == {} and s3.listing("manifests/acme/refused/") == {}


def test_unloadable_model_needs_the_flag(cli, tmp_path, s3):
    d = tmp_path / "bins"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"\0" * 10)
    run = cli("stage", str(d), "--name", "acme/bins")
    assert run.rc == 1 and "--allow-unloadable" in run.err and "no config.json" in run.err
    assert cli("stage", str(d), "--name", "acme/bins", "--allow-unloadable").rc == 0


def test_same_revision_with_other_globs_needs_replace(cli, s3):
    name = "acme/minilm-globs"
    assert cli("stage", TINY, "--name", name).rc == 0
    run = cli("stage", TINY, "--name", name, "--exclude", "README.md")
    assert run.rc == 1 and "--replace" in run.err, run
    replaced = cli("stage", TINY, "--name", name, "--exclude", "README.md", "--replace")
    assert replaced.rc == 0, replaced
    rev = catalog.current_revision(s3, name)
    assert f"models/{name}/{rev}/README.md" not in s3.listing(f"models/{name}/{rev}/")
    assert cli("verify", name).rc == 0
