"""Hashes taken from verified bytes, kept between runs beside the plan's cache directory: a Hub file
by its path (reused only when they match the Hub's hashes), a local file by its absolute path with
the identity that must still hold. They are what lets a re-run skip hashing what it already proved."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from modelferry.tasks.records.integrity import FileHashes
from modelferry.tasks.staging.plan import Plan, PlanFile

log = logging.getLogger("modelferry.stage")


def path_for(cache_dir: Path) -> Path:
    return cache_dir.with_name(cache_dir.name + ".hashes.json")


def load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def save(plan: Plan) -> None:
    """Merge the plan's hashes into its cache."""
    if plan.is_hub:
        entries = {f.path: {**asdict(f.hashes), "part_size": plan.part_size}
                   for f in plan.files if f.hashes and f.hashes.etags()}
    else:
        entries = {str(f.local): {**asdict(f.hashes), "part_size": plan.part_size, "stat": f.stat}
                   for f in plan.files if f.hashes and f.stat}
    path = path_for(plan.cache_dir)
    data = load(path)
    data.update(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def cached(entry: dict | None, f: PlanFile, part_size: int) -> FileHashes | None:
    """Cached hashes for `f` when they describe the same content and part size."""
    if not entry or entry.get("part_size") != part_size or entry.get("size") != f.size:
        return None
    if f.sha256 and entry.get("sha256") != f.sha256:
        return None
    if not f.sha256 and f.git_sha1 and entry.get("git_sha1") != f.git_sha1:
        return None
    return FileHashes(entry["size"], entry["sha256"], entry["git_sha1"], entry["md5"], entry["multipart_etag"])


def identity(path: Path) -> list[int]:
    """What must be unchanged for cached hashes to still describe the file: a copy over it with the
    same size and mtime (cp -p, tar x) still changes the inode or the ctime."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def progress(path: str, size: int, every_s: float = 5.0):
    """Log hashing progress of a big file every few seconds (small files say nothing)."""
    state = {"done": 0, "last": time.monotonic()}

    def report(n: int) -> None:
        state["done"] += n
        now = time.monotonic()
        if now - state["last"] >= every_s:
            state["last"] = now
            log.info("hashing %s: %.1f/%.1f GB", path, state["done"] / 1e9, size / 1e9)

    return report
