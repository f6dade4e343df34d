"""Steps `remote_verify` and `publish`: prove every object from one listing, then write the manifest
(the revision becomes a model only now) and move the current pointer."""

from __future__ import annotations

from modelferry.tasks import catalog
from modelferry.tasks.bucket import Bucket
from modelferry.tasks.errors import IntegrityError
from modelferry.tasks.integrity import FileEntry, Manifest
from modelferry.tasks.plan import Plan, StepStats
from modelferry.tasks.settings import Settings
from modelferry.tasks.survey import current_or_none


def build_manifest(plan: Plan, staged_at: str) -> Manifest:
    files = [FileEntry(path=f.path, size=f.size, sha256=f.hashes.sha256, md5=f.hashes.md5,
                       multipart_etag=f.hashes.multipart_etag, etag=f.etag,
                       git_sha1=f.hashes.git_sha1, lfs=plan.is_hub and f.git_sha1 is None)
             for f in plan.files]
    return Manifest(name=plan.name, revision=plan.revision, source=plan.source, files=files,
                    part_size=plan.part_size, include=plan.include, exclude=plan.exclude,
                    license=plan.license, gated=plan.gated, staged_at=staged_at)


def remote_verify(settings: Settings, plan: Plan) -> tuple[Manifest, StepStats]:
    """Prove every object holds the verified bytes, from one listing: size and the ETag the bucket
    computed, against the ETag predicted from our part MD5s. No object is downloaded."""
    manifest = build_manifest(plan, catalog.now())
    check = catalog.check_listing(Bucket(settings), manifest)
    if not check.ok:
        raise IntegrityError(
            "bucket objects do not match the verified files, nothing published: "
            + "; ".join([f"{p} ({w})" for p, w in check.bad.items()]
                        + [f"{p} (not in the manifest: another writer?)" for p in check.unexpected]),
            list(check.bad) + check.unexpected)
    for f in manifest.files:
        f.etag = check.observed[f.path]
    return manifest, StepStats("remote_verify", files=len(manifest.files), note="all ETags match, 0 bytes read back")


def publish(settings: Settings, plan: Plan, manifest: Manifest, set_current: bool = True) -> StepStats:
    stats = StepStats("publish")
    bucket = Bucket(settings)
    if plan.published and _same_files(plan.published, manifest):
        stats.status, stats.note = "skipped", "same manifest already published"
        stats.bytes = catalog.record_verified(bucket, manifest, by="stage")  # a repaired revision is ok again
        if set_current and current_or_none(bucket, plan.name) != plan.revision:
            stats.bytes += bucket.put_json(catalog.current_key(plan.name), {"revision": plan.revision, "updated_at": catalog.now()})
        return stats
    stats.bytes = catalog.publish(bucket, manifest, set_current)
    stats.files = 1
    stats.note = "manifest written"
    return stats


def _same_files(a: Manifest, b: Manifest) -> bool:
    key = lambda m: sorted((f.path, f.size, f.sha256, f.etag) for f in m.files)  # noqa: E731
    return key(a) == key(b) and (a.include, a.exclude) == (b.include, b.exclude)
