"""The generated SkyPilot task: SkyPilot's own schema, secrets only in `secrets`, clear option errors."""

import shutil
import subprocess

import pytest
import yaml

from modelferry.tasks import options, skytask
from modelferry.tasks.errors import SettingsError
from modelferry.tasks.options import LaunchOptions
from modelferry.tasks.settings import loader_env

ENDPOINT = "https://acct.r2.cloudflarestorage.com"
GB = 10**9


def build(**kw):
    opts = kw.pop("options", LaunchOptions())
    args = dict(model_uri="s3://models/models/acme/m/abc/", served_name="acme/m", model_bytes=16 * GB, weights="r2",
                options=opts, loader_env=loader_env(ENDPOINT))
    args.update(kw)
    return skytask.build_task_config(**args)


@pytest.mark.parametrize("mode", options.MODES)
@pytest.mark.parametrize("strategy", options.STRATEGIES)
def test_generated_task_passes_skypilots_schema(mode, strategy, sky_home):
    cfg = build(options=LaunchOptions(target="sky", mode=mode, strategy=strategy))
    task = skytask.validate(cfg)
    assert task.envs["MODEL_URI"] == "s3://models/models/acme/m/abc/"
    assert task.envs["RUNAI_STREAMER_S3_ENDPOINT"] == ENDPOINT and task.envs["AWS_ENDPOINT_URL"] == ENDPOINT
    assert task.envs["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"] == "0"
    assert all(r.use_spot for r in task.resources)
    if mode == "serve":
        assert cfg["service"]["readiness_probe"]["path"] == "/health"
        assert cfg["service"]["replica_policy"]["dynamic_ondemand_fallback"] is True
    if mode == "job":
        assert cfg["resources"]["job_recovery"]["max_restarts_on_errors"] == 3


def test_secrets_never_reach_envs_or_the_printed_yaml(sky_home):
    cfg = build()
    values = {"AWS_ACCESS_KEY_ID": "AKIAVERYSECRET1", "AWS_SECRET_ACCESS_KEY": "shh-secret-value-2", "VLLM_API_KEY": "api-key-3"}
    assert set(cfg["secrets"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "VLLM_API_KEY"}
    assert all(v is None for v in cfg["secrets"].values())
    assert not set(values) & set(cfg["envs"])
    shown = skytask.redacted_yaml(cfg, values)
    assert all(v not in shown for v in values.values())
    assert yaml.safe_load(shown)["secrets"]["AWS_SECRET_ACCESS_KEY"] == "<redacted>"
    task = skytask.validate(cfg)
    task.update_secrets(values)
    assert all(v not in str(task.to_yaml_config(use_user_specified_yaml=True)) for v in values.values())


def test_hub_source_gets_the_hf_token_secret_and_no_bucket_keys_needed(sky_home):
    cfg = build(model_uri="acme/m", weights="hub", revision="abc")
    assert "HF_TOKEN" in cfg["secrets"] and cfg["envs"]["LOAD_STRATEGY"] == "hub" and cfg["envs"]["MODEL_REVISION"] == "abc"
    skytask.validate(cfg)


def test_accelerators_fit_the_weights():
    fit = skytask.fitting_accelerators(16 * GB, 1.3)  # ~19.4 GiB
    assert fit["L4"] == 1 and fit["H100"] == 1
    big = skytask.fitting_accelerators(140 * GB, 1.3)  # ~170 GiB
    assert big["H100"] == 4 and big["H200"] == 2 and big["L4"] == 8
    assert options.parse_accelerators(["L4:1,A100:2"]) == {"L4": 1, "A100": 2}


@pytest.mark.parametrize("options,kw,message", [
    (LaunchOptions(mode="batch"), {}, "unknown --mode"),
    (LaunchOptions(concurrency=-1), {}, "--concurrency -1"),
    (LaunchOptions(concurrency=100000), {}, "--concurrency 100000"),
    (LaunchOptions(strategy="teleport"), {}, "unknown --strategy"),
    (LaunchOptions(), {"model_bytes": 2000 * GB}, "multi-node"),
    (LaunchOptions(accelerators=["TPU9"]), {}, "unknown accelerator 'TPU9'"),
    (LaunchOptions(accelerators=["T4:1"]), {}, "T4:1 cannot hold"),
    (LaunchOptions(accelerators=["L4:3"]), {}, "accelerator count 3"),
])
def test_bad_options_are_clear_errors(options, kw, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        build(options=options, **kw)


def test_read_only_keys_go_to_nodes_when_set(monkeypatch):
    from modelferry.tasks import settings as config

    s = config.load({"R2_ENDPOINT": ENDPOINT, "R2_BUCKET": "models", "R2_ACCESS_KEY": "writekey1", "R2_SECRET_KEY": "writesecret1"})
    assert config.loader_secrets(s)["AWS_ACCESS_KEY_ID"] == "writekey1"
    monkeypatch.setenv("R2_READ_ACCESS_KEY", "readkey1")
    monkeypatch.setenv("R2_READ_SECRET_KEY", "readsecret1")
    assert config.loader_secrets(s) == {"AWS_ACCESS_KEY_ID": "readkey1", "AWS_SECRET_ACCESS_KEY": "readsecret1"}
    monkeypatch.delenv("R2_READ_SECRET_KEY")
    with pytest.raises(SettingsError, match="R2_READ_SECRET_KEY"):
        config.loader_secrets(s)


def test_names_are_deterministic_per_run():
    a = skytask.run_name("acme/Llama-3.1-8B", "abc", "run-1")
    assert a == skytask.run_name("acme/Llama-3.1-8B", "abc", "run-1") != skytask.run_name("acme/Llama-3.1-8B", "abc", "run-2")
    assert a.startswith("mf-llama-3-1-8b-") and len(a) <= 40


@pytest.mark.parametrize("part", ["setup", "run"])
def test_task_scripts_are_valid_bash(part):
    script = build()[part]
    assert subprocess.run(["bash", "-n", "-c", script], capture_output=True).returncode == 0


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck not installed (make test installs it)")
@pytest.mark.parametrize("compile_cache", [True, False])
@pytest.mark.parametrize("part", ["setup", "run"])
def test_task_scripts_are_shellcheck_clean(part, compile_cache, tmp_path):
    script = tmp_path / f"{part}.sh"
    script.write_text("#!/bin/bash\n" + build(options=LaunchOptions(compile_cache=compile_cache))[part])
    out = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
