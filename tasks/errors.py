"""Typed errors. Each message is one line that names what to fix.

`transient` marks errors worth a retry (network blips, 5xx); everything else fails a step at once.
"""


class ModelferryError(Exception):
    """Base class: a user-facing failure with a one-line message."""

    transient = False


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


class NotStaged(ModelferryError):
    """No published manifest exists for that model/revision."""


class MissingExtra(SettingsError):
    """An optional part of modelferry is not installed."""


def require_extra(module: str, extra: str, for_what: str) -> None:
    """Raise MissingExtra, naming the extra to install, when `module` cannot be imported."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingExtra(f"{for_what} needs the `{extra}` extra: pip install 'modelferry[{extra}]'")
