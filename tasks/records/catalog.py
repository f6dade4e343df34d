"""What is staged in the bucket, and whether it is intact: a model's manifest and current revision,
the listing of every staged revision, and the checks of a revision's objects against its manifest.
Where each of these lives is tasks/records/layout.py's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from modelferry.tasks.records import layout
from modelferry.tasks.clients.bucket import Bucket, ObjectInfo
from modelferry.tasks.errors import (CorruptManifest, IntegrityError, ModelferryError, NoCurrentRevision, NotStaged,
                                     first_line)
from modelferry.tasks.records.integrity import Manifest


def read_manifest(bucket: Bucket, name: str, revision: str) -> Manifest | None:
    """The published manifest, None when there is none. Raises CorruptManifest naming the object
    when it is there but unreadable: one bad object must not pass for "not staged"."""
    key = layout.manifest_key(name, revision)
    data = bucket.get_bytes(key)
    if data is None:
        return None
    try:
        return Manifest.from_json(data)
    except (ValueError, TypeError, KeyError, ModelferryError) as exc:
        raise CorruptManifest(f"{bucket.uri(key)} is corrupt ({first_line(exc, 200)}): restage it with "
                              f"`modelferry stage <source> --name {name} --replace` to rewrite it") from None


def current_revision(bucket: Bucket, name: str) -> str | None:
    """The revision `current.json` points at; None when there is no pointer. Raises CorruptManifest."""
    key = layout.current_key(name)
    data = bucket.get_bytes(key)
    if data is None:
        return None
    try:
        revision = json.loads(data)["revision"]
        if not isinstance(revision, str) or not revision:
            raise ValueError("no revision in it")
        return revision
    except (ValueError, TypeError, KeyError) as exc:
        raise CorruptManifest(f"{bucket.uri(key)} is corrupt ({first_line(exc, 200)}): stage the model again to "
                              f"rewrite it, or pass --revision") from None


def staged_revisions(bucket: Bucket, name: str) -> list[str]:
    """Revisions of `name` that have a manifest (readable or not), from one listing."""
    return sorted(parsed[1] for key in bucket.listing(layout.revisions_prefix(name))
                  if (parsed := layout.parse_manifest_key(key)))


def find_manifest(bucket: Bucket, name: str, revision: str | None) -> Manifest:
    """The published manifest for `name` at `revision` (default: the current one). Raises NotStaged
    when the model has no such revision, NoCurrentRevision when revisions exist but no pointer says
    which one is current (the caller must not take that for "not staged": a launch would fall back
    to a Hub repo that was never the source), CorruptManifest when the object is unreadable."""
    rev = revision or current_revision(bucket, name)
    if rev is None:
        staged = staged_revisions(bucket, name)
        if staged:
            raise NoCurrentRevision(
                f"{name} has no current revision ({bucket.uri(layout.current_key(name))} is missing) but {len(staged)} staged "
                f"revision(s): {', '.join(staged[:5])}; pass --revision, or stage it again to restore the pointer")
    manifest = read_manifest(bucket, name, rev) if rev else None
    if manifest is None:
        what = f"{name}@{rev}" if rev else name
        raise NotStaged(f"{what} is not staged in bucket {bucket.name!r}: run `modelferry stage {name}` first")
    return manifest


@dataclass
class Check:
    ok: bool
    bad: dict[str, str] = field(default_factory=dict)  # path -> why
    unexpected: list[str] = field(default_factory=list)
    observed: dict[str, str] = field(default_factory=dict)  # path -> ETag as stored

    def problems(self) -> list[str]:
        """One "path (why)" per damaged, missing or unexpected object."""
        return [f"{p} ({why})" for p, why in self.bad.items()] + [f"{p} (not in manifest)" for p in self.unexpected]


def compare(manifest: Manifest, listing: dict[str, ObjectInfo]) -> Check:
    """Compare a listing of the revision prefix with the manifest: size and ETag per file, and every
    object the manifest doesn't name (vLLM loads every safetensors file under the prefix)."""
    prefix = layout.model_prefix(manifest.name, manifest.revision)
    check = Check(ok=True)
    expected = set()
    for f in manifest.files:
        key = prefix + f.path
        expected.add(key)
        obj = listing.get(key)
        if obj is None:
            check.bad[f.path] = "missing"
        elif obj.size != f.size:
            check.bad[f.path] = f"size {obj.size} != {f.size}"
        elif obj.etag not in f.accepted_etags():
            check.bad[f.path] = f"ETag {obj.etag} is not the content's ({', '.join(sorted(f.accepted_etags()))})"
        else:
            check.observed[f.path] = obj.etag
    check.unexpected = sorted(k[len(prefix):] for k in listing if k not in expected)
    check.ok = not check.bad and not check.unexpected
    return check


def check_listing(bucket: Bucket, manifest: Manifest) -> Check:
    """The revision prefix as it is now against its manifest, from one listing (size + ETag)."""
    return compare(manifest, bucket.listing(layout.model_prefix(manifest.name, manifest.revision)))


def deep_check(bucket: Bucket, manifest: Manifest) -> dict[str, str]:
    """Re-read every object and compare its sha256 with the manifest. Returns bad path -> why."""
    prefix = layout.model_prefix(manifest.name, manifest.revision)
    bad = {}
    for f in manifest.files:
        digest = hashlib.sha256()
        try:
            body = bucket.stream(prefix + f.path)
        except Exception as exc:  # a missing object is a finding, not a crash
            bad[f.path] = f"unreadable: {exc}"
            continue
        for chunk in body.iter_chunks(8 * 2**20):
            digest.update(chunk)
        if digest.hexdigest() != f.sha256:
            bad[f.path] = f"sha256 {digest.hexdigest()[:16]}... != {f.sha256[:16]}..."
    return bad


def verify(bucket: Bucket, name: str, revision: str | None = None, deep: bool = False) -> dict:
    """Check the bucket against the manifest and record the result for `list`. Never downloads
    unless `deep`. Returns the record; raises IntegrityError naming every bad file."""
    manifest = find_manifest(bucket, name, revision)
    check = check_listing(bucket, manifest)
    bad = dict(check.bad)
    if deep:
        for path, why in deep_check(bucket, manifest).items():
            bad.setdefault(path, why)
    record = layout.verification_record(manifest, bad, check.unexpected, deep)
    layout.put_verified(bucket, record)
    if not record["ok"]:
        names = Check(False, bad, check.unexpected).problems()
        raise IntegrityError(f"{name}@{manifest.revision}: {len(names)} bad file(s): " + "; ".join(names),
                             list(bad) + check.unexpected)
    return record


def list_models(bucket: Bucket) -> list[dict]:
    """One row per published model revision. An unreadable manifest, record or pointer is a row
    saying so, not a failure of the whole listing."""
    keys = bucket.listing(layout.MANIFESTS)
    return [_row(bucket, keys, *parsed, key) for key in sorted(keys) if (parsed := layout.parse_manifest_key(key))]


def _row(bucket: Bucket, keys, name: str, rev: str, key: str) -> dict:
    row = {"name": name, "revision": rev, "current": False, "uri": bucket.uri(layout.model_prefix(name, rev)),
           "manifest": bucket.uri(key), "files": None, "bytes": None, "verified": "never", "verified_at": None,
           "staged_at": None, "gated": None, "license": None}
    try:
        row["current"] = layout.current_key(name) in keys and current_revision(bucket, name) == rev
    except CorruptManifest:
        pass  # its own row says so when it matters: `verify`/`launch` name the object
    try:
        manifest = read_manifest(bucket, name, rev)
    except CorruptManifest:
        row["verified"] = "CORRUPT manifest"
        return row
    record = _json_or_none(bucket, layout.verified_key(name, rev)) if layout.verified_key(name, rev) in keys else None
    row.update(files=len(manifest.files), bytes=manifest.total_bytes, staged_at=manifest.staged_at,
               gated=manifest.gated, license=manifest.license)
    if record:
        row["verified"] = ("ok" if record.get("ok") else "FAILED") + (" (deep)" if record.get("deep") else "")
        row["verified_at"] = record.get("checked_at")
    return row


def _json_or_none(bucket: Bucket, key: str):
    try:
        return bucket.get_json(key)
    except ValueError:
        return None


def set_current(bucket: Bucket, name: str, revision: str) -> None:
    """Make `revision` the one `launch` uses by default. Raises NotStaged when it has no manifest."""
    if read_manifest(bucket, name, revision) is None:
        raise NotStaged(f"{name}@{revision} has no manifest: it can't become current")
    layout.put_current(bucket, name, revision)
