"""The Hugging Face Hub (or any mirror at HF_ENDPOINT): resolve a revision to a commit and its files
with the Hub's own hashes, and download them. huggingface_hub's errors become ours, each naming the fix.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from modelferry.tasks.errors import (GatedRepo, HubError, HubRateLimited, RepoNotFound, RevisionNotFound, SourceError,
                                    TransientHubError, first_line)
from modelferry.tasks.records.integrity import check_relpath
from modelferry.tasks.settings import read

log = logging.getLogger("modelferry.hub")


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # the Hub's LFS sha256; None for files kept in git
    git_sha1: str  # git blob id: sha1 of the pointer for LFS files, of the content otherwise

    @property
    def lfs(self) -> bool:
        return self.sha256 is not None


@dataclass(frozen=True)
class Resolved:
    repo_id: str
    commit: str
    files: list[RemoteFile]
    license: str | None
    gated: bool | str


def _api(token, endpoint):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token or False)


def rate_limit_wait(exc: Exception) -> tuple[float, str] | None:
    """How long a 429 from the Hub says to wait, and which limit it is, as huggingface_hub's own
    download retries read it (its `RateLimit` header, `"api";r=0;t=55`: reset in t seconds, plus
    one); a 429 without the header waits its Retry-After, else a minute. None: not a 429."""
    from huggingface_hub import errors as hf
    from huggingface_hub.utils import parse_ratelimit_headers

    response = exc.response if isinstance(exc, hf.HfHubHTTPError) else None
    if response is None or response.status_code != 429:
        return None
    info = parse_ratelimit_headers(response.headers)
    if info is not None:
        return float(info.reset_in_seconds) + 1, f"{info.resource_type!r} limit"
    retry_after = response.headers.get("Retry-After", "")
    return (float(retry_after) if retry_after.isdigit() else 60.0), "limit"


def _waiting_out_rate_limits(call, what: str, token, endpoint):
    """`call()`, waiting out each 429 as the Hub says, up to MODELFERRY_HUB_WAIT_S in all."""
    bound, waited = read("MODELFERRY_HUB_WAIT_S"), 0.0
    while True:
        try:
            return call()
        except Exception as exc:
            wait = rate_limit_wait(exc)
            if wait is None:
                raise
            seconds, limit = wait
            where = endpoint or "huggingface.co"
            if waited + seconds > bound:
                how = "authenticated requests get a higher limit: set HF_TOKEN" if not token else \
                    "this HF_TOKEN's account is over its limit: wait, or use a token with a higher one"
                raise HubRateLimited(f"{where} rate-limited {what} (429, {limit}) for longer than "
                                     f"MODELFERRY_HUB_WAIT_S={bound:g} s would wait ({seconds:.0f} s more): {how}") from exc
            log.warning("%s rate-limited %s (429, %s): waiting %.0f s as its RateLimit header says", where, what,
                        limit, seconds)
            time.sleep(seconds)
            waited += seconds


def _translate(exc: Exception, repo_id: str, revision: str, token, endpoint) -> Exception:
    from huggingface_hub import errors as hf

    where = f" at {endpoint}" if endpoint else ""
    if isinstance(exc, hf.HFValidationError):
        return SourceError(f"{repo_id!r} is not a Hub repo id (org/name) nor an existing directory")
    if isinstance(exc, hf.LocalEntryNotFoundError):
        return TransientHubError(f"cannot reach the Hub{where or ' (huggingface.co)'} to download from {repo_id}")
    if isinstance(exc, hf.GatedRepoError):
        how = "your HF_TOKEN's account has not been granted access" if token else "set HF_TOKEN"
        return GatedRepo(f"{repo_id} is gated{where}: {how}; accept its terms at https://huggingface.co/{repo_id}")
    if isinstance(exc, hf.RevisionNotFoundError):
        return RevisionNotFound(f"revision {revision!r} does not exist in {repo_id}{where}: use a branch, tag or commit sha")
    if isinstance(exc, hf.RepositoryNotFoundError):
        hint = "check the repo id" + ("" if token else ", or set HF_TOKEN if it is private")
        return RepoNotFound(f"model {repo_id!r} not found{where}: {hint}")
    if isinstance(exc, hf.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status is None or status >= 500 or status == 429:
            return TransientHubError(f"the Hub{where} failed ({status}): {first_line(exc)}")
        return HubError(f"the Hub{where} refused the request ({status}): {first_line(exc)}")
    if isinstance(exc, RuntimeError) and "client has been closed" in str(exc):
        # huggingface_hub closed its shared HTTP client after a network error; a fresh one on retry
        from huggingface_hub.utils import close_session

        close_session()
        return TransientHubError(f"lost the connection to the Hub{where} while talking to {repo_id}")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return SourceError(f"disk full while downloading {repo_id} into {exc.filename or 'the cache'}: "
                           "free space or set HF_HUB_CACHE to a bigger disk")
    if isinstance(exc, (OSError, TimeoutError)) or type(exc).__module__.startswith(("requests", "httpx", "urllib3")):
        return TransientHubError(f"cannot reach the Hub{where or ' (huggingface.co)'}: {exc}")
    return exc


def resolve(repo_id: str, revision: str | None, include: list[str], exclude: list[str],
            token: str | None = None, endpoint: str | None = None) -> Resolved:
    """Resolve `revision` (branch, tag or sha; default `main`) to a commit and list its files with
    the Hub's sha256 (LFS) and git blob ids, filtered by the include/exclude globs."""
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import filter_repo_objects

    revision = revision or "main"
    api = _api(token, endpoint)
    try:
        info = _waiting_out_rate_limits(lambda: api.model_info(repo_id, revision=revision), f"{repo_id}'s info",
                                        token, endpoint)
    except HubRateLimited:
        raise
    except Exception as exc:
        err = _translate(exc, repo_id, revision, token, endpoint)
        # A mirror (olah) answers 401 "not found" for a bad revision too: tell the two apart.
        if isinstance(err, RepoNotFound) and revision != "main":
            try:
                api.model_info(repo_id, revision="main")
                err = RevisionNotFound(f"revision {revision!r} does not exist in {repo_id}: use a branch, tag or commit sha")
            except Exception:
                pass
        raise err from exc
    commit = info.sha
    try:
        tree = _waiting_out_rate_limits(
            lambda: [e for e in api.list_repo_tree(repo_id, revision=commit, recursive=True) if isinstance(e, RepoFile)],
            f"the file listing of {repo_id}", token, endpoint)
    except HubRateLimited:
        raise
    except Exception as exc:
        raise _translate(exc, repo_id, commit, token, endpoint) from exc
    kept = list(filter_repo_objects(tree, allow_patterns=include or None, ignore_patterns=exclude or None,
                                    key=lambda e: e.path))
    if not kept:
        raise SourceError(
            f"no file of {repo_id}@{commit[:12]} matches include={include} exclude={exclude} ({len(tree)} files in all)"
        )
    files = [RemoteFile(check_relpath(e.path), e.size, e.lfs.sha256 if e.lfs else None, e.blob_id) for e in kept]
    card = info.card_data or {}
    license_ = card.get("license") if hasattr(card, "get") else None
    return Resolved(repo_id, commit, sorted(files, key=lambda f: f.path), license_, info.gated or False)


def cache_dir() -> Path:
    """The user's Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached(repo_id: str, commit: str, path: str, where: Path | None = None) -> Path | None:
    """The file's path in the Hugging Face cache (`where`, default the user's), if it is there."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, path, cache_dir=where, revision=commit)
    return Path(found) if isinstance(found, str) else None


def download(repo_id: str, commit: str, path: str, where: Path | None = None, token: str | None = None,
             endpoint: str | None = None) -> Path:
    """Download one file of `repo_id@commit` into the Hugging Face cache at `where` (default: the
    user's), resuming a partial download; a file already there is not fetched again."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, path, revision=commit, cache_dir=where, token=token or False,
                                    endpoint=endpoint))
    except Exception as exc:
        raise _translate(exc, repo_id, commit, token, endpoint) from exc


def commit_of(repo_id: str, revision: str | None, token: str | None = None, endpoint: str | None = None) -> str:
    """The commit a branch or tag points at now (one small request)."""
    revision = revision or "main"
    try:
        return _waiting_out_rate_limits(lambda: _api(token, endpoint).model_info(repo_id, revision=revision).sha,
                                        f"{repo_id}'s info", token, endpoint)
    except HubRateLimited:
        raise
    except Exception as exc:
        raise _translate(exc, repo_id, revision, token, endpoint) from exc
