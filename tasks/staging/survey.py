"""What the bucket already holds of a plan, asked under the revision's lock: the published manifest,
which files are proven there (size + the ETag the bucket computed, against hashes we took from
verified bytes), which can be copied from the current revision inside the bucket, and which objects
under the prefix the plan doesn't name. A proven file is neither downloaded, hashed nor sent again:
that is what makes an unchanged re-stage send 0 bytes and an interrupted one resume."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from modelferry.tasks.records import catalog, layout
from modelferry.tasks.staging import hash_cache
from modelferry.tasks.clients.bucket import Bucket, ObjectInfo
from modelferry.tasks.errors import CorruptManifest, SourceError
from modelferry.tasks.records.integrity import FileHashes, Manifest
from modelferry.tasks.staging.plan import Plan, PlanFile, holds

log = logging.getLogger("modelferry.stage")


def survey(bucket: Bucket, plan: Plan, replace: bool) -> str:
    """Fill in what the bucket holds of `plan` (one listing, HEADs only for files an interrupted run
    left without a hash record here). Returns a one-line summary."""
    plan.published = _published(bucket, plan, replace)
    if plan.published and not replace and (plan.published.include, plan.published.exclude) != (plan.include, plan.exclude):
        raise SourceError(
            f"{plan.name}@{plan.revision} is already staged with include={plan.published.include} "
            f"exclude={plan.published.exclude}; pass --replace to restage it with include={plan.include} "
            f"exclude={plan.exclude}")
    # The caller holds the lock, so any unfinished multipart upload here is a killed run's: abort it.
    for key, upload_id, _ in bucket.multipart_uploads(plan.prefix):
        bucket.abort_upload(key, upload_id)
        log.info("aborted an unfinished multipart upload of %s", key[len(plan.prefix):])
    listing = bucket.listing(plan.prefix)
    _mark_proven(plan, listing)
    _ask_objects(plan, listing, bucket)
    _plan_copies(plan, bucket)
    copies = len(plan.pending()) - len(plan.to_fetch())
    return f"{len(plan.files) - len(plan.pending())} already in bucket" + (
        f", {copies} to copy from @{_copied_revision(plan)}" if copies else "")


def _published(bucket: Bucket, plan: Plan, replace: bool) -> Manifest | None:
    """The revision's published manifest. A corrupt one is rewritten under --replace (every object
    is then proven again from its ETag before a new manifest goes up); otherwise its error says so."""
    try:
        return catalog.read_manifest(bucket, plan.name, plan.revision)
    except CorruptManifest:
        if not replace:
            raise
        log.warning("the manifest of %s@%s is corrupt: it will be rewritten", plan.name, plan.revision)
        return None


def current_or_none(bucket: Bucket, name: str) -> str | None:
    """The current revision, None when the pointer is missing or corrupt (publish rewrites it)."""
    try:
        return catalog.current_revision(bucket, name)
    except CorruptManifest:
        return None


def _mark_proven(plan: Plan, listing: dict[str, ObjectInfo]) -> None:
    known = {f.path: f for f in plan.published.files} if plan.published else {}
    cached = hash_cache.load(hash_cache.path_for(plan.cache_dir)) if plan.is_hub else {}
    wanted = set()
    for f in plan.files:
        key = plan.prefix + f.path
        wanted.add(key)
        if plan.is_hub and f.hashes is None:
            entry = known.get(f.path)
            same = entry and entry.size == f.size and plan.published.part_size == plan.part_size and (
                entry.sha256 == f.sha256 if f.sha256 else entry.git_sha1 == f.git_sha1)
            if same:
                f.hashes = FileHashes(entry.size, entry.sha256, entry.git_sha1 or "", entry.md5, entry.multipart_etag)
            else:
                f.hashes = hash_cache.cached(cached.get(f.path), f, plan.part_size)
        obj = listing.get(key)
        if holds(obj, f):
            f.proven, f.etag = True, obj.etag
    plan.unexpected = sorted(k[len(plan.prefix):] for k in listing if k not in wanted)


def _ask_objects(plan: Plan, listing: dict[str, ObjectInfo], bucket: Bucket) -> None:
    """Files left by an interrupted run whose ETag hashes this machine doesn't have: the hashes that
    run recorded on each object, checked against the ETag the bucket computed."""
    unknown = [f for f in plan.files if not f.proven and not (f.hashes and f.hashes.etags())
               and (o := listing.get(plan.prefix + f.path)) and o.size == f.size]
    if not unknown:
        return
    with ThreadPoolExecutor(16) as pool:
        metas = list(pool.map(lambda f: bucket.head_metadata(plan.prefix + f.path), unknown))
    for f, meta in zip(unknown, metas):
        h = hashes_from_metadata(meta, f)
        etag = listing[plan.prefix + f.path].etag
        if h and etag in h.etags():
            f.hashes, f.proven, f.etag = h, True, etag


def hashes_from_metadata(meta: dict[str, str], f: PlanFile) -> FileHashes | None:
    """Hashes an earlier run of ours recorded on the object when it uploaded verified bytes. They
    are only a claim: the ETag the bucket computed must still match them to prove anything."""
    sha = meta.get("mf-sha256")
    if not sha or not (meta.get("mf-md5") or meta.get("mf-multipart")) or (f.sha256 and sha != f.sha256):
        return None
    if not f.sha256 and meta.get("mf-git-sha1") != f.git_sha1:
        return None
    return FileHashes(f.size, sha, meta.get("mf-git-sha1", ""), meta.get("mf-md5", ""), meta.get("mf-multipart") or None)


def object_metadata(h: FileHashes) -> tuple[tuple[str, str], ...]:
    """What `hashes_from_metadata` reads back: recorded on each object we upload."""
    meta = [("mf-sha256", h.sha256), ("mf-md5", h.md5), ("mf-git-sha1", h.git_sha1), ("mf-multipart", h.multipart_etag)]
    return tuple((k, v) for k, v in meta if v)


def _copied_revision(plan: Plan) -> str:
    src = next(f.copy_from for f in plan.files if f.copy_from)
    return layout.parse_model_key(src)[1][:12]


def _plan_copies(plan: Plan, bucket: Bucket) -> None:
    """Files unchanged since the model's current revision are copied inside the bucket, not sent
    again: same content (sha256, or git blob id for small files) and the same part size, so the
    hashes proven for the old object predict the new object's ETag."""
    current = current_or_none(bucket, plan.name)
    if not current or current == plan.revision:
        return
    try:
        old = catalog.read_manifest(bucket, plan.name, current)
    except CorruptManifest:
        return
    if old is None or old.part_size != plan.part_size:
        return
    by_content = {}
    for e in old.files:
        by_content[("sha256", e.sha256, e.size)] = e
        if e.git_sha1:
            by_content[("git", e.git_sha1, e.size)] = e
    for f in plan.pending():
        e = by_content.get(("sha256", f.sha256, f.size) if f.sha256 else ("git", f.git_sha1, f.size))
        if e:
            f.copy_from = layout.model_prefix(plan.name, current) + e.path
            f.hashes = FileHashes(e.size, e.sha256, e.git_sha1 or "", e.md5, e.multipart_etag)
