"""The suite's fixtures and hooks (its constants and helpers are in helpers.py): real local services,
started once per session and always stopped (an S3 bucket (rclone serve s3), an offline Hub (olah
over git repos) and a Prefect server), the tiers, and two session-wide checks: no secret in what the
session wrote, and no temporary Prefect server started inside pytest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelferry.tasks.clients import processes
from modelferry.tasks.offline import embedded, tiny_llama
from tests.helpers import (ACCESS_KEY, API_KEY, BUCKET, HF_TOKEN, LLAMA, ROOT, SECRET_KEY, SECRETS, TINY, IdleWatch, Run,
                           VllmSession, run_deployment, secret_findings)

# The suite runs from a checkout: its tools are the ones `make` built there, handed to the product
# through the same settings a user would set.
os.environ.setdefault("MODELFERRY_OLAH", str(ROOT / ".venv-olah" / "bin" / "olah-cli"))
os.environ.setdefault("MODELFERRY_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_what_the_session_wrote(tmp_path_factory):
    """After every test, whatever their order: no file the session wrote holds a secret it handed out.
    That is everything under the session's temporary directory (each test's tmp_path, the services'
    dirs: the bucket's files, the Prefect server's database of logs, artifacts and parameters, the
    worker's results, caches and job logs, the vLLM nodes' disks) and the UI screenshots in test-output/.
    Set up first among the session's fixtures, so it runs after they have all stopped and flushed; a
    finding is an error of the session's last test, naming the file and the secret."""
    base = tmp_path_factory.getbasetemp()
    yield
    for home in base.glob("services*/prefect"):  # the server ran: its database must be there to scan
        assert (home / "prefect.db").is_file(), f"no Prefect database in {home} to scan for secrets"
    found = secret_findings([base, ROOT / "test-output"], SECRETS)
    assert not found, "secrets in what the suite wrote:\n" + "\n".join(found)


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
    embedded.commit_files(m, LLAMA, tiny_llama.files(), "tiny Llama, seeded")
    return m


@pytest.fixture(scope="session")
def hub(mirror, session_dir):
    with embedded.olah_mirror(mirror, session_dir / "olah") as url:
        yield url


@pytest.fixture(scope="session")
def prefect_api(session_dir):
    from prefect.context import refresh_global_settings_context

    home = session_dir / "prefect"
    with embedded.prefect_server(home) as api:
        os.environ.update(PREFECT_API_URL=api, PREFECT_HOME=str(home))
        # Prefect in this process read the environment when collection imported it, before this server
        # existed: re-read, or an in-process client (in any thread: the uploader's reports its progress)
        # finds no API URL and starts a temporary server of its own.
        refresh_global_settings_context()
        yield api


@pytest.fixture(autouse=True)
def no_temporary_prefect_server_in_pytest():
    """Fails the test during which Prefect started its temporary (ephemeral) server inside pytest: that
    test ran against a server of its own rather than the session's, and the server, stopped only at
    interpreter exit, prints a logging traceback once pytest has closed its streams."""
    yield
    server = sys.modules.get("prefect.server.api.server")
    started = [s for s in server.SubprocessASGIServer._instances.values() if s.running] if server else []
    for s in started:
        s.stop()
    assert not started, "Prefect started a temporary server in the test process: the test needs the prefect_api fixture"


@pytest.fixture
def env(bucket, hub, prefect_api, sky_home, tmp_path) -> dict[str, str]:
    """Environment for a `modelferry` child: local bucket, local Hub, the test Prefect server, and a
    throwaway HOME for SkyPilot."""
    e = dict(os.environ, **bucket.env(), HF_ENDPOINT=hub, MODELFERRY_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "hf"), HOME=str(sky_home),
             PREFECT_API_URL=prefect_api, MODELFERRY_RETRY_BASE_S="0.2", PYTHONUNBUFFERED="1")
    e.pop("HF_TOKEN", None)
    return e


@pytest.fixture
def cli(env):
    def run(*args: str, timeout: float = 300, extra_env: dict | None = None) -> Run:
        return Run(subprocess.run([sys.executable, "-m", "modelferry.flows", *args], env={**env, **(extra_env or {})},
                                  capture_output=True, text=True, timeout=timeout))

    return run


@pytest.fixture
def slow_bucket(tmp_path):
    """A bucket of its own behind rclone's bandwidth limit, so uploads take seconds."""
    port = processes.free_port()
    args = ("--bwlimit", "8M")
    with embedded.rclone_bucket(tmp_path / "slow", "mf-slow", "slow-access-1", "slow-secret-1", port, args) as b:
        yield b, port, args


@pytest.fixture
def s3(bucket):
    from modelferry.tasks import settings as config
    from modelferry.tasks.clients.bucket import Bucket

    return Bucket(config.load(bucket.env()))


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
                    "worker", "vllm_session"}


def pytest_collection_modifyitems(items):
    """Tiers: a test that uses a real local service is in the full tier only (`make test`); the rest
    are the fast tier (`make test-fast`).

    `make test` runs on two xdist workers, each with its own services, and hands each test file to
    one of them (`--dist loadfile`): a session or module fixture starts once per file, and every
    test that reads the shared vLLM session is in test_real_vllm.py. Files go out in this order:
    real vLLM first (the longest), then the other tests against services, then the in-process ones,
    which fill the end. A test marked `late` runs after the others of its file."""
    for item in items:
        if SERVICE_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.services)
        if "vllm_session" in item.fixturenames:
            item.add_marker(pytest.mark.real_vllm)

    def order(item) -> tuple:
        first = ("vllm_session" in item.fixturenames, item.get_closest_marker("real_vllm") is not None,
                 item.get_closest_marker("services") is not None)
        return item.get_closest_marker("late") is not None, [not f for f in first]

    items.sort(key=order)  # stable: within each rank, the tests keep their order


@pytest.fixture(scope="session")
def worker(bucket, hub, prefect_api, sky_home, tmp_path_factory):
    """Deployments applied and a process worker polling the `local` pool, with the test services' env."""
    work = tmp_path_factory.mktemp("worker")
    env = dict(os.environ, **bucket.env(), HF_ENDPOINT=hub, MODELFERRY_CACHE=str(work / "cache"), HF_HOME=str(work / "hf"),
               HOME=str(sky_home), PREFECT_API_URL=prefect_api, PROJECT_ROOT=str(ROOT), PREFECT_WORKER_QUERY_SECONDS="1",
               PREFECT_WORKER_PREFETCH_SECONDS="5", MODELFERRY_RETRY_BASE_S="0.2")
    env.pop("HF_TOKEN", None)

    def prefect(*args, timeout=180):
        out = subprocess.run([str(processes.BIN / "prefect"), *args], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=timeout)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return out

    prefect("work-pool", "create", "local", "--type", "process", "--overwrite")
    prefect("--no-prompt", "deploy", "--all")
    proc = subprocess.Popen([str(processes.BIN / "prefect"), "worker", "start", "--pool", "local"], env=env, cwd=ROOT,
                            stdout=open(work / "worker.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield env, prefect, work
    finally:
        processes.stop(proc, grace=10)


@pytest.fixture(scope="session")
def vllm_session(worker, bucket) -> VllmSession:
    """The suite's one real vLLM session, four starts shared by every test that needs vLLM: the
    `stage-and-launch/default` deployment (as a user runs it, on the worker) stages the tiny Llama and
    runs node A with the streamer, cold (it saves the compile cache through the bucket) then warm;
    then `modelferry launch --keep` runs node B, a fresh node that restores a saved cache. Node C,
    kept with a one-minute idle limit, prefetches the weights to its disk (the suite's real prefetch
    start): it starts on a thread as soon as the model is published, and is watched there
    (IdleWatch) while the rest runs."""
    from modelferry.tasks import settings as config
    from modelferry.tasks.clients.bucket import Bucket
    from modelferry.tasks.records import catalog

    env, prefect, work = worker
    results_a, results_b, results_c = work / "results-a", work / "results-b", work / "results-c"
    results_b.mkdir()
    results_c.mkdir()
    s3 = Bucket(config.load(bucket.env()))
    # Node C: its own cache (so `down --all` of B's leaves it alone). A's compile cache is of no use
    # to it (the strategy is part of the key), so it starts once the deployment's stage step has
    # published the model, and its start overlaps A's.
    idle = IdleWatch(dict(env, VLLM_API_KEY=API_KEY, HF_TOKEN=HF_TOKEN, MODELFERRY_CACHE=str(work / "cache-c")),
                     staged=lambda: catalog.current_revision(s3, LLAMA) is not None, cwd=results_c, strategy="prefetch")
    deployed = run_deployment(prefect, "stage-and-launch/default", "runs=2", f"results_dir={results_a}",
                              "ready_timeout=300")
    # launch writes its results under ./results
    kept = Run(subprocess.run([sys.executable, "-m", "modelferry.flows", "launch", LLAMA, "--keep", "--json",
                               "--ready-timeout", "300"], env=dict(env, VLLM_API_KEY=API_KEY, HF_TOKEN=HF_TOKEN), cwd=results_b,
                              capture_output=True, text=True, timeout=600))
    yield VllmSession(deployed, results_a, kept, results_b, env, idle)
    idle.done.wait(400)
    for cache in (env, idle.env):  # B, when the `down` test didn't run; C, when it outlived its watch
        subprocess.run([sys.executable, "-m", "modelferry.flows", "down", "--all", "--target", "local"],
                       env=dict(cache, VLLM_API_KEY=API_KEY), capture_output=True, timeout=120)
