"""`launch` serves from a prefix only when that prefix, listed now, is exactly the manifest (issue 13,
item 5): vLLM loads every safetensors file under it, so an extra or damaged object would change the
model served, whatever the last verification record says."""

from __future__ import annotations

from modelferry.tasks.records import catalog, layout
from tests.helpers import make_local_model

SKY = {"VLLM_API_KEY": "mf-guard-api-key"}


def test_launch_refuses_a_prefix_that_is_not_its_manifest_until_stage_repairs_it(cli, s3, tmp_path):
    model = make_local_model(tmp_path / "m")
    assert cli("stage", str(model), "--name", "acme/guarded").rc == 0
    rev = catalog.current_revision(s3, "acme/guarded")
    dry = ("launch", "acme/guarded", "--target", "sky", "--dry-run")
    assert cli(*dry, extra_env=SKY).rc == 0

    s3.put_bytes(f"models/acme/guarded/{rev}/extra.safetensors", b"not part of the model")
    assert s3.get_json(layout.verified_key("acme/guarded", rev))["ok"]  # the record still says fine
    for source in ("r2", "auto"):
        run = cli(*dry, "--source", source, extra_env=SKY)
        assert run.rc == 1, run
        assert "extra.safetensors (not in manifest)" in run.err and "modelferry stage" in run.err, run
        assert "Traceback" not in run.err and "s3://" not in run.out, run

    assert cli("stage", str(model), "--name", "acme/guarded").rc == 0  # removes the stray
    run = cli(*dry, extra_env=SKY)
    assert run.rc == 0 and f"s3://{s3.name}/models/acme/guarded/{rev}/" in run.out, run


def test_launch_refuses_a_damaged_object(cli, s3, tmp_path):
    model = make_local_model(tmp_path / "m")
    assert cli("stage", str(model), "--name", "acme/damaged").rc == 0
    rev = catalog.current_revision(s3, "acme/damaged")
    manifest = catalog.read_manifest(s3, "acme/damaged", rev)
    victim = next(f for f in manifest.files if f.path.endswith(".safetensors"))
    key = f"models/acme/damaged/{rev}/{victim.path}"
    s3.put_bytes(key, bytes(victim.size))  # same size, other bytes: only the ETag tells
    run = cli("launch", "acme/damaged", "--target", "sky", "--dry-run", "--source", "r2", extra_env=SKY)
    assert run.rc == 1 and f"{victim.path} (ETag" in run.err, run
