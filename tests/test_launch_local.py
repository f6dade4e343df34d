"""launch / bench / down on the local target, end to end through the flow `stage-and-launch`:
the generated task's setup runs, the server loads the staged weights with the streamer or from an
s5cmd prefetch, and every phase is timed."""

from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ACCESS_KEY, SECRET_KEY, TINY


def local_servers() -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"tasks.local_target" in cmdline.read_bytes():
                found.append(cmdline.parent.name)
        except OSError:
            pass
    return found


@pytest.fixture
def staged(cli):
    run = cli("stage", TINY)
    assert run.rc == 0, run


def test_bench_both_strategies_cold_and_warm(cli, staged, s3, tmp_path):
    results = tmp_path / "results"
    run = cli("bench", TINY, "--target", "local", "--strategy", "both", "--runs", "2", "--json",
              "--results", str(results))
    assert run.rc == 0, run
    rows = run.json()
    assert sorted((r["strategy"], r["kind"]) for r in rows) == [
        ("prefetch", "cold"), ("prefetch", "warm"), ("stream", "cold"), ("stream", "warm")]
    for r in rows:
        assert r["target"] == "local" and r["source"] == "r2" and r["provision_s"] is None
        phases = [r[k] for k in ("setup_s", "load_s", "engine_s", "first_token_s")]
        assert all(v is not None and v >= 0 for v in phases)
        assert abs(sum(phases) - r["total_s"]) < 0.01
        assert r["weights_s"] is not None and r["weights_s"] <= r["load_s"]
    files = list(results.rglob("*.parquet"))
    assert len(files) == 4 and list(results.rglob("phases.png"))
    df = pd.concat(pd.read_parquet(f) for f in files)
    assert len(df) == 4 and set(df["kind"]) == {"cold", "warm"}
    assert len([k for k in s3.listing(f"bench/{TINY}/") if k.endswith(".parquet")]) >= 4
    assert "won: median total" in run.err
    assert not local_servers(), "teardown left a server running"
    assert SECRET_KEY not in run.out + run.err and ACCESS_KEY not in run.out + run.err


def test_launch_keep_then_down(cli, staged):
    run = cli("launch", TINY, "--target", "local", "--keep")
    assert run.rc == 0, run
    assert local_servers(), "--keep should leave the server running"
    down = cli("down", "--all", "--target", "local")
    assert down.rc == 0 and "mf-" in down.out, down
    import time

    for _ in range(50):
        if not local_servers():
            break
        time.sleep(0.1)
    assert not local_servers()


def test_dry_run_prints_the_task_with_secrets_redacted(cli, staged):
    run = cli("launch", TINY, "--target", "sky", "--mode", "serve", "--dry-run",
              extra_env={"VLLM_API_KEY": "mf-api-key-5e7d"})
    assert run.rc == 0, run
    assert "readiness_probe" in run.out and "runai_streamer" in run.out and "<redacted>" in run.out
    for secret in (SECRET_KEY, ACCESS_KEY, "mf-api-key-5e7d"):
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
def test_launch_refuses_bad_input_clearly(cli, staged, args, extra, message):
    run = cli("launch", *args, extra_env=extra)
    assert run.rc != 0 and message in run.err, run
    assert "Traceback" not in run.err
    assert not local_servers()


def test_hub_source_task_lists_only_the_secrets_it_is_given(cli, staged):
    run = cli("launch", TINY, "--target", "sky", "--source", "hub", "--dry-run",
              extra_env={"VLLM_API_KEY": "mf-api-key-5e7d"})
    assert run.rc == 0, run
    import yaml

    cfg = yaml.safe_load(run.out.split("\n", 1)[1])
    assert cfg["envs"]["LOAD_STRATEGY"] == "hub" and cfg["envs"]["MODEL_URI"] == TINY
    assert "HF_TOKEN" not in cfg["secrets"]  # no token set: nothing SkyPilot would have to ask for
    assert set(cfg["secrets"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "VLLM_API_KEY"}
