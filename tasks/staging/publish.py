"""Steps `remote_verify` and `publish`: prove every object from one listing, then write the manifest
(the revision becomes a model only now) and move the current pointer."""

from __future__ import annotations

from modelferry.tasks.records import catalog, layout
from modelferry.tasks.clients.bucket import Bucket
from modelferry.tasks.errors import IntegrityError
from modelferry.tasks.records.integrity import FileEntry, Manifest
from modelferry.tasks.staging.plan import Plan, StepStats
from modelferry.tasks.settings import Settings
from modelferry.tasks.staging.survey import current_or_none


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
    manifest = build_manifest(plan, layout.now())
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
    """Write the manifest (the revision now exists as a model), its verification record, then the
    current pointer, in that order. A revision already published with the same files keeps its
    manifest; its record is still rewritten, so a repaired revision is ok again."""
    stats = StepStats("publish")
    bucket = Bucket(settings)
    same = bool(plan.published and _same_files(plan.published, manifest))
    if same:
        stats.status, stats.note = "skipped", "same manifest already published"
    else:
        stats.bytes, stats.files, stats.note = layout.put_manifest(bucket, manifest), 1, "manifest written"
    stats.bytes += layout.put_verified(bucket, layout.verification_record(manifest, by="stage"))
    if set_current and not (same and current_or_none(bucket, plan.name) == plan.revision):
        stats.bytes += layout.put_current(bucket, plan.name, plan.revision)
    return stats


def _same_files(a: Manifest, b: Manifest) -> bool:
    key = lambda m: sorted((f.path, f.size, f.sha256, f.etag) for f in m.files)  # noqa: E731
    return key(a) == key(b) and (a.include, a.exclude) == (b.include, b.exclude)
