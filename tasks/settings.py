"""Settings from the environment, under the names of the user's original system, and the R2 client
profile every S3 call here uses.

R2 wants region `auto`, path-style addressing, and no `aws-chunked` CRC trailers (boto3 >= 1.36 adds
them by default and R2 rejected them for months). That profile is the default, not an option.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from urllib.parse import urlparse

from modelferry.tasks.errors import SettingsError

R2_REGION = "auto"
REQUIRED = ("R2_ENDPOINT", "R2_BUCKET", "R2_ACCESS_KEY", "R2_SECRET_KEY")


# --- every variable modelferry reads, declared once --------------------------------------------

def _seconds(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError
    return number


def _count(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError
    return number


@dataclass(frozen=True)
class Variable:
    """One environment variable: its default as written there ("" none), what it is for, and how
    its value is read (None: read by `load`, with the bucket's and the Hub's checks)."""

    name: str
    default: str
    help: str
    kind: str = "text"  # seconds | count | path | text, as the reference shows it
    group: str = "tuning"  # bucket | hub | tuning | tools | local

    def parse(self, value: str):
        reader = {"seconds": _seconds, "count": _count}.get(self.kind)
        if reader is None:
            return value
        try:
            return reader(value)
        except ValueError:
            what = "a number of seconds above 0" if self.kind == "seconds" else "a whole number of at least 1"
            raise SettingsError(f"{self.name}={value!r}: use {what} (default {self.default})") from None


VARIABLES = (
    Variable("R2_ENDPOINT", "", "the bucket's S3 endpoint, e.g. `https://<account>.r2.cloudflarestorage.com`",
             group="bucket"),
    Variable("R2_BUCKET", "", "the bucket's name", group="bucket"),
    Variable("R2_ACCESS_KEY", "", "a read-write token's access key id (stage, verify, gc)", group="bucket"),
    Variable("R2_SECRET_KEY", "", "its secret", group="bucket"),
    Variable("R2_READ_ACCESS_KEY", "", "a read-only token's access key id, given to GPU nodes instead (recommended)",
             group="bucket"),
    Variable("R2_READ_SECRET_KEY", "", "its secret", group="bucket"),
    Variable("HF_TOKEN", "", "the Hugging Face token, for gated models and the Hub's rate limits", group="hub"),
    Variable("HF_ENDPOINT", "", "another Hub (a mirror); default huggingface.co", group="hub"),
    Variable("VLLM_API_KEY", "", "the key vLLM requires on every request: required for --target sky, made up for "
                                 "the local node when unset", group="hub"),
    Variable("MODELFERRY_CACHE", "~/.cache/modelferry", "modelferry's own cache: hashes taken from verified "
             "bytes, files a Dask worker fetched for staging, the local nodes", "path"),
    Variable("MODELFERRY_DOWNLOAD_WORKERS", "2", "Hub files a stage downloads at a time (on one shared link "
             "more delay the first file the upload waits for)", "count"),
    Variable("MODELFERRY_HUB_WAIT_S", "600", "the longest a stage waits out the Hub's rate limit, in all, per call",
             "seconds"),
    Variable("MODELFERRY_STALL_S", "300", "an upload that reads no byte and finishes no file for this long ends",
             "seconds"),
    Variable("MODELFERRY_PROGRESS_S", "10", "seconds between an upload's progress lines", "seconds"),
    Variable("MODELFERRY_LOCK_WAIT_S", "1800", "how long a stage waits for another stage of the same revision",
             "seconds"),
    Variable("MODELFERRY_RETRY_BASE_S", "2", "the first wait between a step's retries (then doubling)", "seconds"),
    Variable("MODELFERRY_RCLONE", "", "the rclone binary of the embedded bucket (default: the `local` extra's, "
             "else PATH)", "path", "tools"),
    Variable("MODELFERRY_OLAH", "", "olah's olah-cli, the offline Hub (default: .venv-olah in a checkout, else "
             "PATH)", "path", "tools"),
    Variable("MODELFERRY_VLLM_PYTHON", "", "the Python of the local node's vLLM venv (default: .venv-vllm in a "
             "checkout)", "path", "tools"),
    Variable("MODELFERRY_UI_PORT", "4200", "`make ui`: the Prefect server's port", "count", "local"),
    Variable("MODELFERRY_DEMO_DIR", ".demo", "`make demo`: where it works (removed and made again)", "path", "local"),
    Variable("MODELFERRY_DEMO_ACCESS_KEY", "demo-access-key", "`make demo`: its local bucket's access key", "text",
             "local"),
    Variable("MODELFERRY_DEMO_SECRET_KEY", "demo-secret-key", "`make demo`: its local bucket's secret", "text", "local"),
)
_BY_NAME = {v.name: v for v in VARIABLES}


def read(name: str, env: dict[str, str] | None = None):
    """The value of `name` (one of VARIABLES), parsed, or its default; a value it can't use is one
    SettingsError naming it."""
    var = _BY_NAME[name]
    value = (os.environ if env is None else env).get(name, "").strip()
    return var.parse(value or var.default) if (value or var.default) else None


def check_all(env: dict[str, str] | None = None) -> None:
    """Every MODELFERRY_ variable that is set, read once, so a bad one fails before anything starts."""
    for var in VARIABLES:
        if var.name.startswith("MODELFERRY_"):
            read(var.name, env)


GROUPS = {"bucket": "The bucket", "hub": "The Hub and the server", "tuning": "Tuning",
          "tools": "Tools of the embedded default", "local": "make demo and make ui"}


def reference_markdown() -> str:
    """The settings reference page (docs/reference/settings.md), from VARIABLES."""
    out = ["# Settings", "", "Every environment variable modelferry reads, from its one declaration "
           "(`modelferry.tasks.settings.VARIABLES`). A value it can't use is one error naming the variable "
           "(exit 2), before anything starts. The bucket's and the Hub's may also come from Prefect Secret "
           "blocks (`modelferry blocks`).", ""]
    for group, title in GROUPS.items():
        out += [f"## {title}", "", "| variable | default | what it is for |", "|---|---|---|"]
        out += [f"| `{v.name}` | {f'`{v.default}`' if v.default else ''} | {v.help} |" for v in VARIABLES
                if v.group == group]
        out.append("")
    return "\n".join(out)


def help_epilog() -> str:
    """The variables, for `modelferry --help`."""
    import textwrap

    width = max(len(v.name) for v in VARIABLES)
    return "settings (environment; docs: Reference, Settings):\n" + "\n".join(
        textwrap.fill(f"{v.help}{f' (default {v.default})' if v.default else ''}", 100,
                      initial_indent=f"  {v.name:<{width}}  ", subsequent_indent=" " * (width + 4))
        for v in VARIABLES)


@dataclass(frozen=True)
class Settings:
    endpoint: str
    bucket: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    hf_token: str | None = field(default=None, repr=False)
    hf_endpoint: str | None = None

    def secrets(self) -> list[str]:
        return [s for s in (self.access_key, self.secret_key, self.hf_token) if s]

    def s5cmd_env(self) -> dict[str, str]:
        """Environment for an s5cmd child: credentials travel here, never on its command line."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(
            AWS_ACCESS_KEY_ID=self.access_key,
            AWS_SECRET_ACCESS_KEY=self.secret_key,
            AWS_REGION=R2_REGION,
            AWS_EC2_METADATA_DISABLED="true",
        )
        return env


def _check_endpoint(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise SettingsError(
            f"R2_ENDPOINT={url!r} is not a URL: use https://<account-id>.r2.cloudflarestorage.com"
        )
    if parsed.path not in ("", "/"):
        raise SettingsError(
            f"R2_ENDPOINT={url!r} has a path: the bucket goes in R2_BUCKET, not in the endpoint URL"
        )
    try:
        parsed.port
    except ValueError:
        raise SettingsError(f"R2_ENDPOINT={url!r} has a bad port number") from None
    return url.rstrip("/")


def _check_bucket(name: str) -> str:
    ok = 3 <= len(name) <= 63 and all(c.islower() or c.isdigit() or c in "-." for c in name)
    if not ok or name[0] in "-." or name[-1] in "-.":
        raise SettingsError(
            f"R2_BUCKET={name!r} is not a bucket name: 3-63 characters, lower-case letters, digits, '-'"
        )
    return name


# Prefect Secret blocks read when the variable is not in the environment (`modelferry blocks` makes them).
BLOCKS = {"R2_ENDPOINT": "modelferry-r2-endpoint", "R2_BUCKET": "modelferry-r2-bucket",
          "R2_ACCESS_KEY": "modelferry-r2-access-key", "R2_SECRET_KEY": "modelferry-r2-secret-key",
          "HF_TOKEN": "modelferry-hf-token", "R2_READ_ACCESS_KEY": "modelferry-r2-read-access-key",
          "R2_READ_SECRET_KEY": "modelferry-r2-read-secret-key"}
_block_cache: dict[str, str | None] = {}


def _from_blocks(names: list[str]) -> dict[str, str]:
    """Values of Prefect Secret blocks for `names`, when a Prefect API is configured."""
    if not os.environ.get("PREFECT_API_URL"):
        return {}
    from prefect.blocks.system import Secret

    out = {}
    for var in names:
        if var not in _block_cache:
            try:
                _block_cache[var] = Secret.load(BLOCKS[var]).get()
            except ValueError:  # no such block
                _block_cache[var] = None
        if _block_cache[var]:
            out[var] = _block_cache[var]
    return out


def load(env: dict[str, str] | None = None) -> Settings:
    """Read settings from the environment, else from Prefect Secret blocks; raise SettingsError
    naming the first missing or malformed variable."""
    explicit = env is not None
    env = os.environ if env is None else env
    missing = [k for k in REQUIRED if not env.get(k, "").strip()]
    if missing and not explicit:  # blocks mode: the HF token may live there too
        env = {**env, **_from_blocks(missing + ([] if env.get("HF_TOKEN") else ["HF_TOKEN"]))}
    missing = [k for k in REQUIRED if not env.get(k, "").strip()]
    if missing:
        raise SettingsError(
            f"{missing[0]} is not set (needed: {', '.join(REQUIRED)}); see the README's quick start"
        )
    settings = Settings(
        endpoint=_check_endpoint(env["R2_ENDPOINT"].strip()),
        bucket=_check_bucket(env["R2_BUCKET"].strip()),
        access_key=env["R2_ACCESS_KEY"].strip(),
        secret_key=env["R2_SECRET_KEY"].strip(),
        hf_token=env.get("HF_TOKEN") or None,
        hf_endpoint=(env.get("HF_ENDPOINT") or None),
    )
    if settings.hf_endpoint:
        _check_hf_endpoint(settings.hf_endpoint)
    redact(settings.secrets())
    return settings


# botocore standard mode: waits of at most 1+2+4+8 s, so a bucket gone for good costs 15 s or less.
REQUEST_ATTEMPTS = 5
# One boto3 session per process (s3_client): each new one parses botocore's S3 and endpoint models
# again (about 0.2 CPU-s here), and a stage makes a client per step.
_SESSION_LOCK = threading.Lock()
_session = None


def _check_hf_endpoint(url: str) -> None:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise SettingsError(f"HF_ENDPOINT={url!r} is not a URL: leave it unset for huggingface.co")


def s3_client(settings: Settings, *, connect_timeout: float = 5, read_timeout: float = 60,
              attempts: int = REQUEST_ATTEMPTS):
    """A boto3 S3 client with the R2 profile. botocore's standard retry mode retries each request
    on throttling (SlowDown, 429), 5xx and a dropped or refused connection, `attempts` tries in all,
    waiting a random 0-2^n s (at most 20 s) between them: a listing or a HEAD outlasts a busy bucket
    without the step starting over. The pre-flight probe asks once (`attempts=1`)."""
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=R2_REGION,
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"max_attempts": attempts, "mode": "standard"},
        max_pool_connections=32,
    )
    global _session
    with _SESSION_LOCK:  # a boto3 session is not thread-safe; the clients it makes are
        _session = _session or boto3.session.Session()  # the keys go to each client, never into it
        return _session.client(
            "s3",
            endpoint_url=settings.endpoint,
            aws_access_key_id=settings.access_key,
            aws_secret_access_key=settings.secret_key,
            config=config,
        )


class _Redactor(logging.Filter):
    """Replaces every known secret in log records. Belt and braces: nothing here should log one."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def scrub(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            record.msg = self.scrub(record.getMessage())
            record.args = None
        return True


_redactor = _Redactor()


def redact(secrets: list[str]) -> None:
    """Register secrets to be scrubbed from every log handler installed now or later."""
    _redactor.secrets.update(s for s in secrets if s and len(s) >= 4)
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if _redactor not in handler.filters:
                handler.addFilter(_redactor)


def scrub(text: str) -> str:
    return _redactor.scrub(text)


def loader_env(endpoint: str) -> dict[str, str]:
    """What vLLM's Run:ai streamer (and s5cmd, and boto3) on a node need to read the bucket, minus
    the keys. Non-AWS endpoints need the endpoint (vLLM hands AWS_ENDPOINT_URL to the streamer) and
    path-style addressing."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_REGION": R2_REGION,
        "AWS_DEFAULT_REGION": R2_REGION,
    }


def loader_secrets(settings: Settings) -> dict[str, str]:
    """The keys a node reads the bucket with: the read-only pair when R2_READ_ACCESS_KEY /
    R2_READ_SECRET_KEY are set, else the write pair. These go in SkyPilot `secrets`, never `envs`."""
    read = {k: os.environ[k] for k in ("R2_READ_ACCESS_KEY", "R2_READ_SECRET_KEY") if os.environ.get(k)}
    if not read:
        read = _from_blocks(["R2_READ_ACCESS_KEY", "R2_READ_SECRET_KEY"])
    read_key, read_secret = read.get("R2_READ_ACCESS_KEY"), read.get("R2_READ_SECRET_KEY")
    if bool(read_key) != bool(read_secret):
        raise SettingsError("set both R2_READ_ACCESS_KEY and R2_READ_SECRET_KEY, or neither")
    if read_key:
        redact([read_key, read_secret])
        return {"AWS_ACCESS_KEY_ID": read_key, "AWS_SECRET_ACCESS_KEY": read_secret}
    return {"AWS_ACCESS_KEY_ID": settings.access_key, "AWS_SECRET_ACCESS_KEY": settings.secret_key}


def save_blocks(env: dict[str, str] | None = None) -> list[str]:
    """Store every setting present in the environment as a Prefect Secret block. Returns block names."""
    from prefect.blocks.system import Secret

    env = os.environ if env is None else env
    saved = []
    for var, block in BLOCKS.items():
        if env.get(var):
            Secret(value=env[var]).save(block, overwrite=True)
            saved.append(block)
    return saved


if __name__ == "__main__":  # python -m modelferry.tasks.settings > docs/reference/settings.md
    print(reference_markdown(), end="")
