"""Against moto, whose multipart ETags are S3's (and R2's) `md5(part md5s)-N`, not rclone's MD5."""

import hashlib
import os

import pytest

from modelferry.tasks.records import catalog, housekeeping, layout
from modelferry.tasks import settings as config
from modelferry.tasks.clients.bucket import Bucket
from modelferry.tasks.errors import Locked
from modelferry.tasks.records.lock import Lock
from modelferry.tasks.records.integrity import MiB
from tests import standins
from tests.helpers import steps_by_name


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    with standins.moto_bucket(tmp_path_factory.mktemp("moto"), "mf-moto") as b:
        yield b


def test_multipart_etag_is_predicted_on_s3_semantics(cli, moto, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    big = os.urandom(120 * MiB + 7)  # 3 parts of 50 MiB
    (model / "model.safetensors").write_bytes(big)
    (model / "config.json").write_text("{}")
    run = cli("stage", str(model), "--name", "acme/big", "--allow-unloadable", "--json", extra_env=moto.env())
    assert run.rc == 0, run
    assert steps_by_name(run.json())["remote_verify"]["status"] == "completed"
    s3 = Bucket(config.load(moto.env()))
    rev = catalog.current_revision(s3, "acme/big")
    entry = {f.path: f for f in catalog.read_manifest(s3, "acme/big", rev).files}["model.safetensors"]
    parts = [hashlib.md5(big[i:i + 50 * MiB]).digest() for i in range(0, len(big), 50 * MiB)]
    assert entry.etag == hashlib.md5(b"".join(parts)).hexdigest() + "-3" == entry.multipart_etag
    assert entry.etag != entry.md5

    # A silently replaced object (same size) is caught from the listing alone.
    s3.s3.put_object(Bucket=moto.bucket, Key=f"models/acme/big/{rev}/model.safetensors", Body=big[::-1])
    bad = cli("verify", "acme/big", extra_env=moto.env())
    assert bad.rc == 1 and "model.safetensors" in bad.err, bad


def test_two_stages_of_one_revision_at_once_send_it_once(env, moto, tmp_path):
    """moto honours If-None-Match, as R2 and S3 do: the bucket lock serialises the two writers."""
    import json
    import subprocess
    import sys

    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(os.urandom(30 * MiB))
    (model / "config.json").write_text("{}")
    args = [sys.executable, "-m", "modelferry.flows", "stage", str(model), "--name", "acme/twice", "--allow-unloadable", "--json"]
    procs = [subprocess.Popen(args, env={**env, **moto.env(), "MODELFERRY_CACHE": str(tmp_path / f"c{i}")},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    sent = [steps_by_name(json.loads(o))["upload"]["bytes"] for o, _ in outs]
    assert sorted(sent) == [0, 30 * MiB + 2]
    s3 = Bucket(config.load(moto.env()))
    assert s3.listing("locks/") == {}
    assert catalog.verify(s3, "acme/twice")["ok"]


def test_lock_refuses_a_second_holder_and_breaks_a_stale_one(moto):
    s3 = Bucket(config.load(moto.env()))
    first = Lock(s3, "acme/locked", "r1")
    first.acquire(wait=0)
    with pytest.raises(Locked, match="another stage of this revision is running"):
        Lock(s3, "acme/locked", "r1").acquire(wait=0.5, poll=0.1)
    stale = Lock(s3, "acme/locked", "r1", ttl=0)
    stale.acquire(wait=0)  # the first holder "died": ttl 0 makes its lock stale
    first.release()  # not the holder any more: leaves the new lock alone
    assert s3.get_json(layout.lock_key("acme/locked", "r1"))["id"] == stale.owner["id"]
    stale.release()
    assert s3.listing("locks/") == {}


def small_model(root):
    root.mkdir()
    (root / "model.safetensors").write_bytes(os.urandom(MiB))
    (root / "config.json").write_text("{}")
    return root


def test_gc_aborts_leftover_multipart_uploads_and_unpublished_revisions(cli, moto, tmp_path):
    s3 = Bucket(config.load(moto.env()))
    model = small_model(tmp_path / "m")
    assert cli("stage", str(model), "--name", "acme/kept", "--allow-unloadable", extra_env=moto.env()).rc == 0
    # What killed runs leave: an unfinished multipart upload, and objects of a revision never published.
    s3.s3.create_multipart_upload(Bucket=moto.bucket, Key="models/acme/killed/r1/model.safetensors")
    s3.put_bytes("models/acme/killed/r2/config.json", b"{}")
    young = cli("gc", "--json", extra_env=moto.env()).json()
    assert young["removed_revisions"] == []  # inside the grace period
    # (moto reports every upload as initiated in 2010, so its upload is already past any grace period)
    dry = cli("gc", "--grace-hours", "0", "--dry-run", "--json", extra_env=moto.env()).json()
    assert dry["removed_revisions"] == ["acme/killed@r2"] and s3.listing("models/acme/killed/")
    done = cli("gc", "--grace-hours", "0", "--json", extra_env=moto.env()).json()
    assert young["aborted_uploads"] + done["aborted_uploads"] == ["models/acme/killed/r1/model.safetensors"]
    assert s3.multipart_uploads("models/") == [] and s3.listing("models/acme/killed/") == {}
    assert cli("verify", "acme/kept", extra_env=moto.env()).rc == 0  # published revisions untouched


def test_gc_on_a_sub_prefix_removes_only_unpublished_revisions_under_it(moto):
    s3 = Bucket(config.load(moto.env()))
    for name in ("gcsub/kept", "gcsub/killed", "gcother/killed"):
        s3.put_bytes(f"models/{name}/r1/config.json", b"{}")
    for name in ("gcsub/killed", "gcother/killed"):
        s3.s3.create_multipart_upload(Bucket=moto.bucket, Key=f"models/{name}/r1/model.safetensors")
    s3.put_bytes(layout.manifest_key("gcsub/kept", "r1"), b"{}")  # published: gc must never touch it
    done = housekeeping.gc(s3, grace_s=0, prefix="models/gcsub/")
    assert done["removed_revisions"] == ["gcsub/killed@r1"]
    assert done["aborted_uploads"] == ["models/gcsub/killed/r1/model.safetensors"]
    assert s3.listing("models/gcsub/killed/") == {} and list(s3.listing("models/gcsub/kept/")) == [
        "models/gcsub/kept/r1/config.json"]
    assert list(s3.listing("models/gcother/")) == ["models/gcother/killed/r1/config.json"]  # outside the prefix
    assert [k for k, _, _ in s3.multipart_uploads("models/gcother/")] == ["models/gcother/killed/r1/model.safetensors"]


def test_stage_aborts_its_own_revisions_leftover_multipart_upload(cli, moto, tmp_path):
    s3 = Bucket(config.load(moto.env()))
    model = small_model(tmp_path / "m")
    first = cli("stage", str(model), "--name", "acme/leftover", "--allow-unloadable", extra_env=moto.env())
    assert first.rc == 0
    rev = catalog.current_revision(s3, "acme/leftover")
    s3.s3.create_multipart_upload(Bucket=moto.bucket, Key=f"models/acme/leftover/{rev}/model.safetensors")
    again = cli("stage", str(model), "--name", "acme/leftover", "--allow-unloadable", extra_env=moto.env())
    assert again.rc == 0 and "aborted an unfinished multipart upload" in again.err, again
    assert s3.multipart_uploads("models/acme/leftover/") == []
