"""Against moto, whose multipart ETags are S3's (and R2's) `md5(part md5s)-N`, not rclone's MD5."""

import hashlib
import os

import pytest

from tasks import catalog, standins
from tasks import settings as config
from tasks.bucket import Bucket
from tasks.integrity import MiB
from tests.conftest import steps_by_name


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
