"""A transfer too big for one machine, cut into shares for Dask workers: about equal bytes each, a
plan copy per worker that carries nothing that can't travel, and the results folded back."""

from __future__ import annotations

import dataclasses

from modelferry.tasks.staging.pipeline import STEP_NAMES
from modelferry.tasks.staging.plan import Plan, PlanFile, StepStats, cache_root


def split(files: list[PlanFile], n: int) -> list[list[PlanFile]]:
    """`files` in at most `n` groups of about equal bytes (largest file first into the lightest group)."""
    groups: list[list[PlanFile]] = [[] for _ in range(max(1, min(n, len(files))))]
    loads = [0] * len(groups)
    for f in sorted(files, key=lambda f: -f.size):
        i = loads.index(min(loads))
        groups[i].append(f)
        loads[i] += f.size
    return [g for g in groups if g]


def shard(plan: Plan, files: list[PlanFile]) -> Plan:
    """A copy of `plan` for one worker: only `files`."""
    return dataclasses.replace(plan, files=files, published=None, unexpected=[])


def on_this_machine(part: Plan) -> Plan:
    """A shard as its worker runs it: its hash cache is this machine's."""
    if part.is_hub:
        part.cache_dir = cache_root() / "hub" / part.source["repo_id"] / part.revision
    return part


def combine(shard_rows: list[list[StepStats]], copied: int, note: str) -> list[StepStats]:
    """One row per step over all shards: files and bytes summed, seconds of the slowest shard."""
    out = []
    for name in STEP_NAMES:
        rows = [r for rows in shard_rows for r in rows if r.step == name]
        done = [r for r in rows if r.status == "completed"]
        out.append(StepStats(name, status="completed" if done else "skipped",
                             seconds=max((r.seconds for r in rows), default=0.0),
                             files=sum(r.files for r in rows), bytes=sum(r.bytes for r in rows),
                             copied=copied if name == "upload" else 0,
                             note=note if done else (rows[0].note if rows else "")))
    return out


def merge(plan: Plan, done: list[PlanFile]) -> None:
    """Take a shard's results (hashes, proof) back into the plan."""
    by_path = {f.path: f for f in plan.files}
    for f in done:
        mine = by_path[f.path]
        mine.hashes, mine.sha256, mine.proven, mine.etag = f.hashes, f.sha256, f.proven, f.etag
