"""Typed errors. Each message is one line that names what to fix.

`transient` marks errors worth a retry (network blips, 5xx); everything else fails a step at once.
"""


class ModelferryError(Exception):
    """Base class: a user-facing failure with a one-line message."""

    transient = False
    step: str | None = None
    """The pipeline step it broke, when a task that runs several steps at once raised it (flows/steps.py)."""


class SettingsError(ModelferryError):
    """A setting (environment variable or option) is missing or malformed."""


class BucketError(ModelferryError):
    """The bucket refused or failed a request."""


class EndpointUnreachable(BucketError):
    transient = True


class BadCredentials(BucketError):
    pass


class BucketNotFound(BucketError):
    pass


class AccessDenied(BucketError):
    pass


class TransientBucketError(BucketError):
    transient = True


class HubError(ModelferryError):
    """The Hub (or the mirror at HF_ENDPOINT) refused or failed a request."""


class RepoNotFound(HubError):
    pass


class RevisionNotFound(HubError):
    pass


class GatedRepo(HubError):
    pass


class HubRateLimited(HubError):
    """The Hub kept answering 429 for longer than we wait (MODELFERRY_HUB_WAIT_S)."""


class TransientHubError(HubError):
    transient = True


class IntegrityError(ModelferryError):
    """Bytes are not what the chain says they should be. Never retried."""

    def __init__(self, message: str, bad_files: list[str] | None = None):
        super().__init__(message)
        self.bad_files = bad_files or []


class SourceError(ModelferryError):
    """The model to stage can't be staged as asked (empty, unloadable, globs match nothing...)."""


class TransferError(ModelferryError):
    """s5cmd failed."""

    transient = True


class CorruptManifest(IntegrityError):
    """A manifest or pointer object exists but cannot be read."""


class NotStaged(ModelferryError):
    """No published manifest exists for that model/revision."""


class NoCurrentRevision(ModelferryError):
    """Revisions are staged but none is marked current."""


class Locked(ModelferryError):
    """Another stage of the same revision kept the lock past our wait."""


class LaunchError(ModelferryError):
    """SkyPilot refused or failed the launch."""


class NotReady(ModelferryError):
    """The server did not become ready in time."""


class OrchestrationError(ModelferryError):
    """Prefect could not be reached or started."""


class StepFailed(ModelferryError):
    """A step failed; carries the rows recorded so far (the failed one last)."""

    def __init__(self, message: str, rows: list[dict], cause: BaseException):
        super().__init__(message)
        self.rows = rows
        self.cause = cause


class LastAttempt(Exception):
    """How a step's last attempt failed: its `cause`, and how many attempts Prefect made. Raised by
    the step's own task so that the task run shows the failure; `flows.steps.Steps` unwraps it."""

    def __init__(self, cause: BaseException, attempts: int):
        super().__init__(cause, attempts)  # in args, so it survives pickling (a Dask worker's share)
        self.cause, self.attempts = cause, attempts

    def __str__(self) -> str:
        return str(self.cause)


class RefreshFailed(ModelferryError):
    """Some watched models failed; `rows` holds every model's outcome."""

    def __init__(self, message: str, rows: list[dict]):
        super().__init__(message)
        self.rows = rows


class MissingExtra(SettingsError):
    """An optional part of modelferry is not installed."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, or its type's name when the message is empty."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


def require_extra(module: str, extra: str, for_what: str) -> None:
    """Raise MissingExtra, naming the extra to install, when `module` cannot be imported."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingExtra(f"{for_what} needs the `{extra}` extra: pip install 'modelferry[{extra}]'")
