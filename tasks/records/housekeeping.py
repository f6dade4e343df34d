"""Housekeeping: what killed runs and old stages leave in the bucket, and its removal. Published
revisions go only when `prune` is asked to drop them; nothing here touches a running stage."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from modelferry.tasks.records import layout
from modelferry.tasks.clients.bucket import Bucket
from modelferry.tasks.records.catalog import current_revision, read_manifest, staged_revisions


def gc(bucket: Bucket, grace_s: float = 24 * 3600, dry_run: bool = False, prefix: str = layout.MODELS) -> dict:
    """Clean what killed runs left under `prefix` (all models by default, or e.g. `models/acme/`),
    once older than `grace_s`: unfinished multipart uploads (their parts are billed but invisible),
    and revision prefixes that never got a manifest and are not locked by a running stage. Published
    revisions are never touched. Returns what was (or, `dry_run`, would be) removed."""
    cutoff = time.time() - grace_s
    stale_uploads = [(k, u) for k, u, started in bucket.multipart_uploads(prefix) if started < cutoff]
    objects = bucket.listing(prefix)
    revisions: dict[tuple[str, str], list[str]] = {}
    for key in objects:
        if parsed := layout.parse_model_key(key):
            revisions.setdefault(parsed[:2], []).append(key)
    published = {parsed for k in bucket.listing(layout.MANIFESTS) if (parsed := layout.parse_manifest_key(k))}
    locked = set(bucket.listing(layout.LOCKS))
    orphans = {}
    for (name, rev), keys in revisions.items():
        if (name, rev) in published or layout.lock_key(name, rev) in locked:
            continue
        if max(objects[k].modified for k in keys) < cutoff:
            orphans[f"{name}@{rev}"] = keys
    if not dry_run:
        for key, upload_id in stale_uploads:
            bucket.abort_upload(key, upload_id)
        for keys in orphans.values():
            bucket.delete(keys)
    return {"aborted_uploads": [k for k, _ in stale_uploads], "removed_revisions": sorted(orphans),
            "removed_objects": sum(len(v) for v in orphans.values()), "dry_run": dry_run}


def compile_caches(bucket: Bucket) -> list[dict]:
    """One row per stored vLLM compile cache (see tasks/on_node/compile_cache.py)."""
    objects = bucket.listing(layout.COMPILE_CACHES)
    rows = []
    for key in sorted(objects):
        if not (cache_key := layout.parse_compile_cache_manifest_key(key)):
            continue
        manifest = bucket.get_json(key) or {}
        files = manifest.get("files", [])
        rows.append({"key": cache_key, "files": len(files), "bytes": sum(f["size"] for f in files),
                     "saved_at": datetime.fromtimestamp(manifest.get("saved_at", 0), timezone.utc).isoformat(timespec="seconds"),
                     "stored_bytes": sum(o.size for k, o in objects.items() if k.startswith(layout.compile_cache_prefix(cache_key)))})
    return rows


def drop_compile_caches(bucket: Bucket, older_than_s: float, dry_run: bool = False) -> list[str]:
    """Delete compile caches saved more than `older_than_s` ago (manifest first, so none is half-restored)."""
    cutoff = time.time() - older_than_s
    stale = [r["key"] for r in compile_caches(bucket)
             if datetime.fromisoformat(r["saved_at"]).timestamp() < cutoff]
    if not dry_run:
        for key in stale:
            bucket.delete([layout.compile_cache_manifest_key(key)])
            bucket.delete(list(bucket.listing(layout.compile_cache_prefix(key))))
    return stale


def prune(bucket: Bucket, name: str, keep: int) -> list[str]:
    """Keep the current revision and the newest others up to `keep` in all; delete the rest
    (manifest first, so a revision stops being a model before its objects go). Returns pruned revisions."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    current = current_revision(bucket, name)
    manifests = {rev: read_manifest(bucket, name, rev) for rev in staged_revisions(bucket, name)}
    others = sorted((r for r in manifests if r != current), key=lambda r: manifests[r].staged_at, reverse=True)
    ordered = ([current] if current in manifests else []) + others
    pruned = ordered[keep:]
    for rev in pruned:
        bucket.delete([layout.manifest_key(name, rev), layout.verified_key(name, rev)])
        bucket.delete(list(bucket.listing(layout.model_prefix(name, rev))))
    return pruned
