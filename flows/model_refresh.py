"""Flow `model-refresh`: keep the watched models (deployments/watched-models.yaml) staged at the
head of the branch they follow. An unchanged model is a no-op that sends 0 bytes."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml
from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from modelferry.flows.stage_model import stage_model
from modelferry.flows.steps import step
from modelferry.tasks import catalog, hub
from modelferry.tasks import settings as config
from modelferry.tasks.bucket import Bucket
from modelferry.tasks.errors import SettingsError

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
    return catalog.prune(bucket, model, keep)


@flow(name="model-refresh", log_prints=False)
def model_refresh(watchlist: str | None = None) -> list[dict]:
    """For each watched model: if its branch moved, stage the new commit, verify it, make it current,
    and prune old revisions. `watchlist`: a YAML file on the worker (default: the packaged list).
    Returns one row per model."""
    rows = []
    for entry in load_watchlist(watchlist or WATCHLIST):
        model = entry["model"]
        commit = head_commit(model, entry["follow"])
        current = catalog.current_revision(Bucket(config.load()), model)
        if current == commit:
            rows.append({"model": model, "follow": entry["follow"], "revision": commit, "status": "unchanged",
                         "bytes_sent": 0, "files_copied": 0, "pruned": ""})
            continue
        steps = stage_model(model, revision=commit, include=entry["include"], exclude=entry["exclude"],
                            set_current=False)
        pruned = promote(model, commit, entry["keep"])
        upload = next(r for r in steps if r["step"] == "upload")
        rows.append({"model": model, "follow": entry["follow"], "revision": commit, "status": "staged",
                     "previous": current, "bytes_sent": upload["bytes"],
                     "files_copied": upload["copied"], "pruned": ",".join(p[:12] for p in pruned)})
    if flow_run.id:
        create_table_artifact(table=rows, key="model-refresh", description="model-refresh: one row per watched model")
    return rows

