"""Sharded staging on a real local Dask cluster of two worker processes."""

from __future__ import annotations

import os

from modelferry.tasks import catalog, embedded
from tests import standins
from tests.conftest import steps_by_name

MiB = 2**20


def test_stage_shards_files_over_dask_workers_and_publishes_once(cli, env, mirror, s3, tmp_path):
    repo = "acme/sharded"
    files = {"config.json": b'{"architectures": ["Sharded"]}'}
    files |= {f"model-{i:05d}-of-00006.safetensors": os.urandom((i + 1) * MiB) for i in range(6)}
    embedded.commit_files(mirror, repo, files, lfs_files={p for p in files if p.endswith(".safetensors")})
    total = sum(len(b) for b in files.values())
    tampered = "acme/sharded-tampered"
    embedded.commit_files(mirror, tampered, files, lfs_files={p for p in files if p.endswith(".safetensors")},
                          lfs_bytes={"model-00002-of-00006.safetensors": os.urandom(2 * MiB)})
    with standins.dask_cluster(tmp_path / "dask", env, workers=2) as address:
        failed = cli("stage", tampered, "--task-runner", "dask", "--dask-address", address, "--json")
        run = cli("stage", repo, "--task-runner", "dask", "--dask-address", address, "--json")
    # A share that meets a bad file fails the run naming it; nothing is published.
    assert failed.rc == 1, failed
    assert failed.json()[-1]["step"] == "local_verify" and failed.json()[-1]["status"] == "failed"
    assert "model-00002-of-00006.safetensors" in failed.err and "sha256" in failed.err
    assert s3.listing(f"manifests/{tampered}/") == {}
    assert "model-00002-of-00006.safetensors" not in {k.rsplit("/", 1)[-1] for k in s3.listing(f"models/{tampered}/")}

    assert run.rc == 0, run
    by = steps_by_name(run.json())
    assert by["download"]["bytes"] == total and by["upload"]["bytes"] == total and by["upload"]["files"] == 7
    assert "2 shards on Dask" in by["upload"]["note"]

    # Each worker fetched its own share; together exactly the model, and no worker kept a weight file.
    fetched = []
    for i in range(2):
        root = tmp_path / "dask" / f"worker-{i}" / "cache" / "hub" / repo
        fetched.append({p.name[:-len(".metadata")] for p in root.rglob(".cache/huggingface/download/*.metadata")})
        assert not list(root.rglob("*.safetensors")), f"worker {i} kept weights it had proven"
    assert fetched[0] and fetched[1] and not fetched[0] & fetched[1] and fetched[0] | fetched[1] == set(files)
    assert not (tmp_path / "cache" / "hub" / repo).exists(), "the flow's own machine downloaded model files"

    # The manifest was written once, by the flow, and the bucket holds exactly the model's bytes.
    assert [m for m in catalog.list_models(s3) if m["name"] == repo][0]["files"] == 7
    assert cli("verify", repo, "--deep").rc == 0


def test_dask_address_without_dask_runner_is_a_usage_error(cli):
    run = cli("stage", "acme/x", "--dask-address", "tcp://127.0.0.1:1")
    assert run.rc == 2 and "--task-runner dask" in run.err
