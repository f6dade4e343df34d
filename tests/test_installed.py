"""What a user gets from `pip install modelferry`: the wheel built from this checkout, installed with
its core dependencies only (resolved from pyproject's ranges, as a user's pip would) into a fresh
venv, run from a directory outside the checkout against the local bucket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from modelferry.tasks.clients import processes
from modelferry.tasks.offline import embedded, tiny_llama
from modelferry.tasks.records import catalog
from tests.helpers import ROOT

pytestmark = pytest.mark.services
CORE_LIMIT = 2**30  # the core install stays under 1 GiB


def tiny_checkpoint(path: Path) -> Path:
    """A loadable-looking checkpoint: config.json and one small safetensors file."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (path / "model.safetensors").write_bytes(tiny_llama.to_safetensors({"w": ("U8", (256,), bytes(range(256)))}))
    return path


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("installed")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "dist"), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((work / "dist").glob("modelferry-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    out = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return venv


def test_core_install_is_lean(core_venv):
    size = du(core_venv)
    print(f"core install: {size / 2**20:.0f} MiB in {core_venv}")
    assert size < CORE_LIMIT
    names = subprocess.run([str(core_venv / "bin" / "pip"), "list", "--format=json"], capture_output=True,
                           text=True, check=True).stdout
    installed = {p["name"].lower() for p in json.loads(names)}
    assert not installed & {"torch", "runai-model-streamer", "safetensors", "prefect-dask", "dask", "moto", "pytest"}


@pytest.fixture
def installed(core_venv, bucket, tmp_path):
    """Run the installed `modelferry` (or another of its console scripts) from a directory outside the
    checkout, with nothing of the checkout's environment but the bucket settings."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MODELFERRY_", "VIRTUAL_ENV"))}
    env.update(bucket.env(), HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "prefect"),
               MODELFERRY_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "hf"), PATH=f"{core_venv / 'bin'}:/usr/bin:/bin",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90", VLLM_API_KEY="mf-installed-api-key",
               PYTHONNOUSERSITE="1")

    def run(*args: str, tool: str = "modelferry", timeout: float = 300, **popen) -> subprocess.CompletedProcess:
        return subprocess.run([str(core_venv / "bin" / tool), *args], cwd=elsewhere, env=env, capture_output=True,
                              text=True, timeout=timeout, **popen)

    run.env, run.cwd = env, elsewhere
    return run


def test_installed_commands_work_from_anywhere(installed, tmp_path):
    """--help, a stage against the local bucket and a SkyPilot dry run, from outside the checkout."""
    out = installed("--help")
    assert out.returncode == 0 and "stage" in out.stdout and "R2_ENDPOINT" in out.stdout, out.stderr
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    out = installed("stage", str(ckpt), "--name", "acme/installed", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    assert {r["step"] for r in json.loads(out.stdout)} >= {"resolve", "upload", "publish"}
    out = installed("launch", "acme/installed", "--target", "sky", "--dry-run")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "runai_streamer" in out.stdout and "s3://" in out.stdout
    assert str(ROOT) not in out.stdout  # the compile-cache tool mounts from the installed package
    out = installed("stage", str(ckpt), "--name", "acme/installed", "--task-runner", "dask")
    assert out.returncode == 2 and "modelferry[dask]" in out.stderr and "Traceback" not in out.stderr


def test_installed_package_deploys_and_its_worker_runs_a_refresh(installed, hub, mirror, prefect_api, s3, tmp_path):
    """`modelferry deploy` from the installed package, a process worker of that venv, and a run of
    model-refresh with a watch list given as a parameter: no checkout anywhere on the way."""
    repo = "acme/installed-refresh"
    ckpt = tiny_checkpoint(tmp_path / "refresh-ckpt")
    commit = embedded.commit_files(mirror, repo, {p.name: p for p in ckpt.iterdir()}, "v1")
    watch = tmp_path / "watch.yaml"
    watch.write_text(yaml.safe_dump({"models": [{"model": repo, "follow": "main", "keep": 1}]}))
    installed.env.update(HF_ENDPOINT=hub, PREFECT_API_URL=prefect_api, PREFECT_WORKER_QUERY_SECONDS="1")
    out = installed("deploy", "--pool", "installed", "--watchlist", str(watch), "--launch-name", "installed",
                    "--refresh-name", "installed")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "model-refresh/installed" in out.stdout
    worker = processes.start([str(installed.env["PATH"].split(":")[0] + "/prefect"), "worker", "start", "--pool",
                              "installed"], tmp_path / "worker.log", installed.env, installed.cwd)
    try:
        out = installed("deployment", "run", "model-refresh/installed", "--watch", "--watch-timeout", "300",
                        tool="prefect", timeout=360)
        assert out.returncode == 0 and "Completed" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    finally:
        processes.stop(worker, grace=10)
    assert catalog.current_revision(s3, repo) == commit
