"""The pure parts of the chain: hashes, ETag prediction, paths, manifest, settings."""

import hashlib
import os

import pytest

from modelferry.tasks import settings as config
from modelferry.tasks.errors import IntegrityError, SettingsError, SourceError
from modelferry.tasks.records.integrity import (MiB, FileEntry, Manifest, check_relpath, git_blob_sha1, hash_file, local_revision,
                             multipart_etag, part_size_for)


def test_hash_file_matches_independent_hashes(tmp_path):
    data = os.urandom(5 * MiB + 123)
    p = tmp_path / "f"
    p.write_bytes(data)
    h = hash_file(p, part_size=2 * MiB)
    assert h.sha256 == hashlib.sha256(data).hexdigest()
    assert h.md5 == hashlib.md5(data).hexdigest()
    assert h.git_sha1 == git_blob_sha1(data)
    parts = [hashlib.md5(data[i:i + 2 * MiB]).digest() for i in range(0, len(data), 2 * MiB)]
    assert h.multipart_etag == hashlib.md5(b"".join(parts)).hexdigest() + "-3"


def test_single_part_file_has_no_multipart_etag(tmp_path):
    p = tmp_path / "small"
    p.write_bytes(b"x" * 10)
    assert hash_file(p, part_size=MiB).multipart_etag is None
    (tmp_path / "empty").write_bytes(b"")
    assert hash_file(tmp_path / "empty", part_size=MiB).md5 == "d41d8cd98f00b204e9800998ecf8427e"


def test_git_blob_sha1_is_gits():
    # `printf hello | git hash-object --stdin`
    assert git_blob_sha1(b"hello") == "b6fc4c620b67d95f953a5c1c1230aaab5db5a1b0"


def test_part_size_fits_10000_parts():
    assert part_size_for(10 * MiB) == 50 * MiB
    assert part_size_for(10_000 * 50 * MiB) == 51 * MiB  # exactly 10,000 parts: the SDK would grow them
    big = 1024**4  # 1 TiB needs parts over 100 MiB
    size = part_size_for(big)
    assert size % MiB == 0 and -(-big // size) <= 10_000
    with pytest.raises(SourceError):
        part_size_for(6 * 1024**4)


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../b", "a\\b", "", ".", "a//b", "a/./b", "x\n"])
def test_unsafe_paths_are_refused(bad):
    with pytest.raises(SourceError):
        check_relpath(bad)


def test_manifest_round_trip_and_path_check():
    m = Manifest("org/m", "abc", {"kind": "hub"}, [FileEntry("a b/c.json", 3, "00", "11", None, "11")], 50 * MiB)
    again = Manifest.from_json(m.to_json())
    assert again == m
    evil = m.to_json().replace('"a b/c.json"', '"../../escape"')
    with pytest.raises(SourceError):
        Manifest.from_json(evil)
    with pytest.raises(IntegrityError):
        Manifest.from_json(m.to_json().replace('"schema_version": 1', '"schema_version": 99'))


def test_local_revision_depends_on_content_only():
    a = local_revision([("b", 1, "x"), ("a", 2, "y")])
    assert a == local_revision([("a", 2, "y"), ("b", 1, "x")]) and a.startswith("local-")
    assert a != local_revision([("a", 2, "y"), ("b", 1, "z")])


def test_multipart_etag_format():
    assert multipart_etag([hashlib.md5(b"a").digest()]).endswith("-1")


GOOD = {"R2_ENDPOINT": "https://acct.r2.cloudflarestorage.com", "R2_BUCKET": "models",
        "R2_ACCESS_KEY": "AKIAEXAMPLE1", "R2_SECRET_KEY": "secretexample1"}


@pytest.mark.parametrize("var", list(GOOD))
def test_missing_setting_is_named(var):
    with pytest.raises(SettingsError, match=var):
        config.load({**GOOD, var: ""})


@pytest.mark.parametrize("var,value", [("R2_ENDPOINT", "acct.r2.cloudflarestorage.com"),
                                       ("R2_ENDPOINT", "https://acct.r2.cloudflarestorage.com/models"),
                                       ("R2_ENDPOINT", "http://host:notaport"),
                                       ("R2_BUCKET", "Bad_Bucket"), ("R2_BUCKET", "ab")])
def test_malformed_setting_is_named(var, value):
    with pytest.raises(SettingsError, match=var):
        config.load({**GOOD, var: value})


def test_settings_repr_hides_keys():
    s = config.load(GOOD)
    assert "secretexample1" not in repr(s) and "AKIAEXAMPLE1" not in repr(s)


def test_object_keys_longer_than_s3_allows_are_refused():
    from modelferry.tasks.records.integrity import check_key_length

    assert check_key_length("models/a/b/r/" + "x" * 900)
    with pytest.raises(SourceError, match="1,024|1024"):
        check_key_length("models/a/b/r/" + "x" * 1100)


def test_bad_files_keeps_paths_whole():
    from modelferry.tasks.staging.pipeline import bad_files

    exc = bad_files({"w (v2).bin": "sha256 aa... != Hub bb...", "a.safetensors": "changed since resolve hashed it"})
    assert exc.bad_files == ["a.safetensors", "w (v2).bin"] and exc.step == "local_verify"
    assert "w (v2).bin (sha256 aa... != Hub bb...)" in str(exc)


def test_an_error_that_is_not_ours_becomes_its_steps_typed_error_and_keeps_its_transience():
    from modelferry.tasks.errors import HubError, TransferError, TransientBucketError
    from modelferry.tasks.staging.pipeline import in_step

    disk = OSError(28, "No space left on device")
    typed = in_step(disk, "upload")
    assert isinstance(typed, TransferError) and typed.step == "upload" and typed.__cause__ is disk
    assert not typed.transient and "No space left on device" in str(typed)  # a bug or a full disk: no retry
    blip = ConnectionError("reset")
    blip.transient = True
    assert isinstance(in_step(blip, "download"), HubError) and in_step(blip, "download").transient
    ours = in_step(TransientBucketError("503"), "upload")
    assert type(ours) is TransientBucketError and ours.step == "upload" and ours.transient
    assert in_step(ours, "download").step == "upload"  # the step first named stays
    ctrl_c = KeyboardInterrupt()
    assert in_step(ctrl_c, "upload") is ctrl_c
