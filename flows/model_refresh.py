"""Flow `model-refresh`: keep the watched models (deployments/watched-models.yaml) staged at the
head of the branch they follow. An unchanged model is a no-op that sends 0 bytes."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import yaml
from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from modelferry.flows.stage_model import stage_model
from modelferry.flows.steps import step
from modelferry.tasks.clients import hub
from modelferry.tasks.records import catalog, housekeeping
from modelferry.tasks import settings as config
from modelferry.tasks.clients.bucket import Bucket
from modelferry.tasks.errors import RefreshFailed, SettingsError
from modelferry.tasks.settings import scrub

log = logging.getLogger("modelferry.refresh")

# The default watch list ships in the package; a deployment or `modelferry refresh --watchlist` gives another.
WATCHLIST = resources.files("modelferry.deployments") / "watched-models.yaml"


def load_watchlist(path: str | Path) -> list[dict]:
    raw = yaml.safe_load((Path(path) if isinstance(path, str) else path).read_text()) or {}
    out = []
    for i, entry in enumerate(raw.get("models") or []):
        if not isinstance(entry, dict) or not entry.get("model"):
            raise SettingsError(f"{path}: entry {i + 1} needs a `model:` (org/name)")
        keep = int(entry.get("keep", 2))
        if keep < 1:
            raise SettingsError(f"{path}: {entry['model']}: keep must be at least 1")
        out.append({"model": entry["model"], "follow": str(entry.get("follow") or "main"),
                    "include": list(entry.get("include") or []), "exclude": list(entry.get("exclude") or []),
                    "keep": keep})
    return out


@step("check-head")
def head_commit(model: str, follow: str):
    s = config.load()
    return hub.commit_of(model, follow, s.hf_token, s.hf_endpoint)


@step("promote")
def promote(model: str, revision: str, keep: int) -> list[str]:
    bucket = Bucket(config.load())
    catalog.verify(bucket, model, revision)
    catalog.set_current(bucket, model, revision)
    return housekeeping.prune(bucket, model, keep)


@flow(name="model-refresh", log_prints=False)
def model_refresh(watchlist: str | None = None) -> list[dict]:
    """For each watched model: if its branch moved, stage the new commit, verify it, make it current,
    and prune old revisions. `watchlist`: a YAML file on the worker (default: the packaged list).
    Each model succeeds or fails on its own: the run goes through the whole list, reports one row
    per model, and fails at the end naming every model that failed."""
    rows = []
    for entry in load_watchlist(watchlist or WATCHLIST):
        try:
            rows.append(_refresh(entry))
        except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the others
            cause = getattr(exc, "cause", exc)
            log.error("%s: %s", entry["model"], scrub(str(cause)))
            rows.append({"model": entry["model"], "follow": entry["follow"], "revision": None, "status": "failed",
                         "bytes_sent": 0, "files_copied": 0, "pruned": "", "error": scrub(str(cause))[:300]})
    if flow_run.id:
        create_table_artifact(table=rows, key="model-refresh", description="model-refresh: one row per watched model")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        raise RefreshFailed(f"{len(failed)} of {len(rows)} watched model(s) failed: "
                            + "; ".join(f"{r['model']}: {r['error']}" for r in failed), rows)
    return rows


def _refresh(entry: dict) -> dict:
    model = entry["model"]
    commit = head_commit(model, entry["follow"])
    current = catalog.current_revision(Bucket(config.load()), model)
    if current == commit:
        return {"model": model, "follow": entry["follow"], "revision": commit, "status": "unchanged",
                "bytes_sent": 0, "files_copied": 0, "pruned": ""}
    staged = stage_model(model, revision=commit, include=entry["include"], exclude=entry["exclude"],
                         set_current=False)
    pruned = promote(model, staged.revision, entry["keep"])
    upload = next(r for r in staged.rows if r["step"] == "upload")
    return {"model": model, "follow": entry["follow"], "revision": staged.revision, "status": "staged",
            "previous": current, "bytes_sent": upload["bytes"], "files_copied": upload["copied"],
            "pruned": ",".join(p[:12] for p in pruned)}


