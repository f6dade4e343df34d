"""Real local services for the suite, started once per session and always stopped:
an S3 bucket (rclone serve s3), an offline Hub (olah over git repos) and a Prefect server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelferry.tasks import embedded, processes

ACCESS_KEY = "mf-test-access-7f3a1c"
SECRET_KEY = "mf-test-secret-9c1e55d2"
HF_TOKEN = "hf_mftesttoken4b8e2a"
BUCKET = "mf-test"
TINY = "sentence-transformers/all-MiniLM-L6-v2"
ROOT = Path(__file__).resolve().parent.parent

# The suite runs from a checkout: its tools are the ones `make` built there, handed to the product
# through the same settings a user would set.
os.environ.setdefault("MODELFERRY_OLAH", str(ROOT / ".venv-olah" / "bin" / "olah-cli"))


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def bucket(session_dir):
    with embedded.rclone_bucket(session_dir / "bucket", BUCKET, ACCESS_KEY, SECRET_KEY) as b:
        yield b


@pytest.fixture(scope="session")
def mirror(session_dir) -> Path:
    m = session_dir / "hub-mirror"
    embedded.commit_files(m, TINY, embedded.tiny_model_files(), "all-MiniLM-L6-v2")
    return m


@pytest.fixture(scope="session")
def hub(mirror, session_dir):
    with embedded.olah_mirror(mirror, session_dir / "olah") as url:
        yield url


@pytest.fixture(scope="session")
def prefect_api(session_dir):
    home = session_dir / "prefect"
    with embedded.prefect_server(home) as api:
        os.environ.update(PREFECT_API_URL=api, PREFECT_HOME=str(home))
        yield api


@pytest.fixture
def env(bucket, hub, prefect_api, sky_home, tmp_path) -> dict[str, str]:
    """Environment for a `modelferry` child: local bucket, local Hub, the test Prefect server, and a
    throwaway HOME for SkyPilot."""
    e = dict(os.environ, **bucket.env(), HF_ENDPOINT=hub, MODELFERRY_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "hf"), HOME=str(sky_home),
             PREFECT_API_URL=prefect_api, MODELFERRY_RETRY_BASE_S="0.2", PYTHONUNBUFFERED="1")
    e.pop("HF_TOKEN", None)
    return e


class Run:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.rc, self.out, self.err = proc.returncode, proc.stdout, proc.stderr

    def json(self):
        return json.loads(self.out)

    def __repr__(self):
        return f"<rc={self.rc}\nstdout:\n{self.out[-3000:]}\nstderr:\n{self.err[-3000:]}>"


@pytest.fixture
def cli(env):
    def run(*args: str, timeout: float = 300, extra_env: dict | None = None) -> Run:
        return Run(subprocess.run([sys.executable, "-m", "modelferry.flows", *args], env={**env, **(extra_env or {})},
                                  capture_output=True, text=True, timeout=timeout))

    return run


@pytest.fixture
def s3(bucket):
    from modelferry.tasks import settings as config
    from modelferry.tasks.bucket import Bucket

    return Bucket(config.load(bucket.env()))


def steps_by_name(rows: list[dict]) -> dict[str, dict]:
    return {r["step"]: r for r in rows}


@pytest.fixture(scope="session")
def sky_home(tmp_path_factory):
    """SkyPilot writes ~/.sky at import: give it a throwaway HOME for the session."""
    home = tmp_path_factory.mktemp("sky-home")
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    yield home
    # Stop SkyPilot's local API server if anything started it under this HOME.
    subprocess.run([str(processes.BIN / "sky"), "api", "stop"], env=dict(os.environ, HOME=str(home)),
                   capture_output=True, timeout=120)
    if old is not None:
        os.environ["HOME"] = old


SERVICE_FIXTURES = {"bucket", "hub", "mirror", "prefect_api", "env", "cli", "s3", "moto", "sky_env", "slow_bucket",
                    "worker"}


def pytest_collection_modifyitems(items):
    """Tiers: a test that uses a real local service is in the full tier only (`make test`); the rest
    are the fast tier (`make test-fast`)."""
    for item in items:
        if SERVICE_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.services)
