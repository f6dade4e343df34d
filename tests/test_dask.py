"""Sharded staging on a real local Dask cluster of two worker processes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from modelferry.tasks.offline import embedded
from modelferry.tasks.records import catalog
from tests import standins
from tests.helpers import steps_by_name

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

    # Each worker fetched its own share into modelferry's own cache (its hash record names what it
    # verified); together exactly the model. No worker kept a weight file, and no HF cache got one.
    fetched = []
    for i in range(2):
        worker = tmp_path / "dask" / f"worker-{i}"
        records = list((worker / "cache" / "hub" / repo).glob("*.hashes.json"))
        fetched.append(set(json.loads(records[0].read_text())) if records else set())
        kept = [p for p in (worker / "cache" / "hf").rglob("*") if p.is_file() and "blobs" in p.parts]
        assert not kept, f"worker {i} kept weights it had proven: {kept}"
        assert not list((worker / "hf").rglob("*.safetensors")), f"worker {i} wrote into its HF cache"
    assert fetched[0] and fetched[1] and not fetched[0] & fetched[1] and fetched[0] | fetched[1] == set(files)
    hf_name = "models--" + repo.replace("/", "--")
    assert not (Path(env["HF_HOME"]) / "hub" / hf_name).exists(), "the flow's own machine downloaded model files"

    # The manifest was written once, by the flow, and the bucket holds exactly the model's bytes.
    assert [m for m in catalog.list_models(s3) if m["name"] == repo][0]["files"] == 7
    assert cli("verify", repo, "--deep").rc == 0


def test_dask_address_without_dask_runner_is_a_usage_error(cli):
    run = cli("stage", "acme/x", "--dask-address", "tcp://127.0.0.1:1")
    assert run.rc == 2 and "--task-runner dask" in run.err
