"""What is staged in the bucket, and whether it is intact: the layout, publish, verify, list.

Layout (one bucket):
    models/<org>/<name>/<revision>/<files>          what vLLM loads (`s3://bucket/models/.../<revision>/`)
    manifests/<org>/<name>/revisions/<revision>.json  written last, only after remote verification
    manifests/<org>/<name>/verified/<revision>.json   the latest `verify` result, for `list`
    manifests/<org>/<name>/current.json               the revision `launch` uses by default
    modelferry/bucket.json                            what we learned about this bucket (its ETag style)
Manifests live outside the prefix vLLM loads, so a loader listing the weights never sees them, and a
revision without a manifest is never a model here.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone

from modelferry.tasks.bucket import Bucket, ObjectInfo
from modelferry.tasks.errors import (CorruptManifest, IntegrityError, Locked, ModelferryError, NoCurrentRevision,
                                     NotStaged, first_line)
from modelferry.tasks.integrity import PARTS, WHOLE, FileHashes, Manifest


def model_prefix(name: str, revision: str) -> str:
    return f"models/{name}/{revision}/"


def manifest_key(name: str, revision: str) -> str:
    return f"manifests/{name}/revisions/{revision}.json"


def verified_key(name: str, revision: str) -> str:
    return f"manifests/{name}/verified/{revision}.json"


def current_key(name: str) -> str:
    return f"manifests/{name}/current.json"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_manifest(bucket: Bucket, name: str, revision: str) -> Manifest | None:
    """The published manifest, None when there is none. Raises CorruptManifest naming the object
    when it is there but unreadable: one bad object must not pass for "not staged"."""
    key = manifest_key(name, revision)
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
    key = current_key(name)
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
    prefix = f"manifests/{name}/revisions/"
    return sorted(k[len(prefix):-len(".json")] for k in bucket.listing(prefix) if k.endswith(".json"))


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
                f"{name} has no current revision ({bucket.uri(current_key(name))} is missing) but {len(staged)} staged "
                f"revision(s): {', '.join(staged[:5])}; pass --revision, or stage it again to restore the pointer")
    manifest = read_manifest(bucket, name, rev) if rev else None
    if manifest is None:
        what = f"{name}@{rev}" if rev else name
        raise NotStaged(f"{what} is not staged in bucket {bucket.name!r}: run `modelferry stage {name}` first")
    return manifest


BUCKET_FACTS = "modelferry/bucket.json"


def etag_styles(bucket: Bucket) -> set[str]:
    """The multipart ETag style(s) worth hashing for: the one this bucket was seen to use, or both
    until a stage has seen it (each costs an MD5 pass over every multipart file)."""
    facts = bucket.get_json(BUCKET_FACTS) or {}
    style = facts.get("multipart_etag")
    return {style} if style in (WHOLE, PARTS) else {WHOLE, PARTS}


def learn_etag_style(bucket: Bucket, hashes: FileHashes, etag: str) -> str | None:
    """Record which style a proven multipart object's ETag has, when both were predicted and exactly
    one matched. Returns the style learned, if any."""
    if not (hashes.md5 and hashes.multipart_etag) or hashes.md5 == hashes.multipart_etag:
        return None
    style = WHOLE if etag == hashes.md5 else PARTS if etag == hashes.multipart_etag else None
    if style:
        bucket.put_json(BUCKET_FACTS, {"multipart_etag": style, "learned_at": now()})
    return style


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
    prefix = model_prefix(manifest.name, manifest.revision)
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
    return compare(manifest, bucket.listing(model_prefix(manifest.name, manifest.revision)))


def deep_check(bucket: Bucket, manifest: Manifest) -> dict[str, str]:
    """Re-read every object and compare its sha256 with the manifest. Returns bad path -> why."""
    prefix = model_prefix(manifest.name, manifest.revision)
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
    record = {"name": name, "revision": manifest.revision, "ok": not bad and not check.unexpected, "deep": deep,
              "checked_at": now(), "files": len(manifest.files), "bytes": manifest.total_bytes, "bad": bad,
              "unexpected": check.unexpected}
    bucket.put_json(verified_key(name, manifest.revision), record)
    if not record["ok"]:
        names = Check(False, bad, check.unexpected).problems()
        raise IntegrityError(f"{name}@{manifest.revision}: {len(names)} bad file(s): " + "; ".join(names),
                             list(bad) + check.unexpected)
    return record


def publish(bucket: Bucket, manifest: Manifest, set_current: bool = True) -> int:
    """Write the manifest (the revision now exists as a model), its verification record, then the
    current pointer. Returns bytes written."""
    sent = bucket.put_json(manifest_key(manifest.name, manifest.revision), manifest.to_json())
    sent += record_verified(bucket, manifest, by="stage")
    if set_current:
        sent += bucket.put_json(current_key(manifest.name), {"revision": manifest.revision, "updated_at": now()})
    return sent


def record_verified(bucket: Bucket, manifest: Manifest, by: str) -> int:
    """Record that every object was just proven against `manifest` (bytes written)."""
    return bucket.put_json(verified_key(manifest.name, manifest.revision), {
        "name": manifest.name, "revision": manifest.revision, "ok": True, "deep": False, "checked_at": now(),
        "files": len(manifest.files), "bytes": manifest.total_bytes, "bad": {}, "unexpected": [], "by": by})


def list_models(bucket: Bucket) -> list[dict]:
    """One row per published model revision. An unreadable manifest, record or pointer is a row
    saying so, not a failure of the whole listing."""
    keys = bucket.listing("manifests/")
    rows = []
    for key in sorted(keys):
        if "/revisions/" not in key or not key.endswith(".json"):
            continue
        name, rev = key[len("manifests/"):-len(".json")].split("/revisions/")
        rows.append(_row(bucket, keys, name, rev, key))
    return rows


def _row(bucket: Bucket, keys, name: str, rev: str, key: str) -> dict:
    row = {"name": name, "revision": rev, "current": False, "uri": bucket.uri(model_prefix(name, rev)),
           "manifest": bucket.uri(key), "files": None, "bytes": None, "verified": "never", "verified_at": None,
           "staged_at": None, "gated": None, "license": None}
    try:
        row["current"] = current_key(name) in keys and current_revision(bucket, name) == rev
    except CorruptManifest:
        pass  # its own row says so when it matters: `verify`/`launch` name the object
    try:
        manifest = read_manifest(bucket, name, rev)
    except CorruptManifest:
        row["verified"] = "CORRUPT manifest"
        return row
    record = _json_or_none(bucket, verified_key(name, rev)) if verified_key(name, rev) in keys else None
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
    if read_manifest(bucket, name, revision) is None:
        raise NotStaged(f"{name}@{revision} has no manifest: it can't become current")
    bucket.put_json(current_key(name), {"revision": revision, "updated_at": now()})


def prune(bucket: Bucket, name: str, keep: int) -> list[str]:
    """Keep the current revision and the newest others up to `keep` in all; delete the rest
    (manifest first, so a revision stops being a model before its objects go). Returns pruned revisions."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    current = current_revision(bucket, name)
    manifests = {}
    for key in bucket.listing(f"manifests/{name}/revisions/"):
        rev = key.rsplit("/", 1)[-1].removesuffix(".json")
        manifests[rev] = read_manifest(bucket, name, rev)
    others = sorted((r for r in manifests if r != current), key=lambda r: manifests[r].staged_at, reverse=True)
    ordered = ([current] if current in manifests else []) + others
    pruned = ordered[keep:]
    for rev in pruned:
        bucket.delete([manifest_key(name, rev), verified_key(name, rev)])
        bucket.delete(list(bucket.listing(model_prefix(name, rev))))
    return pruned


def lock_key(name: str, revision: str) -> str:
    return f"locks/{name}/{revision}.json"


class Lock:
    """Who may write a revision: one stage at a time, across Prefect runs and plain CLI processes on
    any machine, by conditional writes in the bucket. Created with If-None-Match; a lock older than
    `ttl` (its holder was killed) is taken over, and kept fresh by its heartbeat, with If-Match on the
    ETag last seen, so of two waiters only one takes a stale lock and nobody overwrites a live one.
    On a server without conditional writes (rclone serve s3) the read-back still catches most races.

        with Lock(bucket, name, revision).held(wait=1800):
            ...  # write the revision"""

    def __init__(self, bucket: Bucket, name: str, revision: str, ttl: float = 3600):
        self.bucket, self.key, self.ttl = bucket, lock_key(name, revision), ttl
        self.owner = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self.etag: str | None = None
        self.lost = threading.Event()  # set when the heartbeat finds another holder
        self._beat: threading.Event | None = None

    def _body(self) -> bytes:
        return json.dumps({**self.owner, "since": time.time()}).encode()

    def acquire(self, wait: float = 1800, poll: float = 1.0, log=None) -> None:
        deadline = time.monotonic() + wait
        announced = False
        while True:
            etag = self.bucket.put_if_absent(self.key, self._body())
            if etag and self._still_mine():
                return self._start()
            read = self._read()
            held = read[0] if read else None
            if read and self._stale(held):
                # its holder died (killed, or past the ttl): replace exactly the lock we read
                if self.bucket.put_if_match(self.key, self._body(), read[1]) and self._still_mine():
                    return self._start()
                continue
            if time.monotonic() > deadline:
                raise Locked(f"{self.key} is held by {held.get('host')} pid {held.get('pid')} since "
                             f"{time.strftime('%H:%M:%S', time.gmtime(held.get('since', 0)))} UTC: another stage of this "
                             "revision is running; retry when it ends" if held else f"{self.key} stayed busy")
            if log and not announced:
                log.info("another stage of this revision holds %s; waiting", self.key)
                announced = True
            time.sleep(poll)

    def _read(self) -> tuple[dict | None, str] | None:
        """(holder, ETag) of the lock as stored now; holder None when unreadable. None: no lock."""
        read = self.bucket.get_bytes_and_etag(self.key)
        if read is None:
            return None
        try:
            holder = json.loads(read[0])
        except ValueError:
            holder = None
        return (holder if isinstance(holder, dict) else None), read[1]

    def _still_mine(self) -> bool:
        read = self._read()
        if read and read[0] and read[0].get("id") == self.owner["id"]:
            self.etag = read[1]
            return True
        return False

    def _start(self) -> None:
        self._beat = threading.Event()
        self._beater = threading.Thread(target=self._heartbeat, name="lock-heartbeat", daemon=True)
        self._beater.start()

    def _heartbeat(self) -> None:
        """Keep `since` fresh while we hold the lock, so a long stage is never taken for a dead one."""
        while not self._beat.wait(max(self.ttl / 4, 1.0)):
            etag = self.bucket.put_if_match(self.key, self._body(), self.etag)
            if etag is None:
                self.lost.set()
                return
            self.etag = etag

    def _stale(self, held: dict | None) -> bool:
        if held is None:
            return True  # unreadable: no holder can be alive behind it
        if time.time() - held.get("since", 0) > self.ttl:
            return True
        if held.get("host") == self.owner["host"] and held.get("pid"):
            try:
                os.kill(held["pid"], 0)
            except ProcessLookupError:
                return True  # same machine, process gone: a killed run, resume now
            except PermissionError:
                pass
        return False

    def release(self) -> None:
        if self._beat is not None:
            self._beat.set()
            self._beater.join()  # a heartbeat caught mid-write must not put the lock back after we delete it
            self._beat = None
        if self._still_mine():
            self.bucket.delete([self.key])

    def check(self) -> None:
        """Raise Locked when the heartbeat found another holder: whoever writes next must not publish."""
        if self.lost.is_set():
            raise Locked(f"{self.key} was taken over by another stage while this one ran: nothing published; "
                         "check that stage, then stage again")

    @contextmanager
    def held(self, wait: float | None = None, log=None):
        """Hold the lock for the block. `wait` defaults to MODELFERRY_LOCK_WAIT_S (1800 s)."""
        self.acquire(wait=float(os.environ.get("MODELFERRY_LOCK_WAIT_S", "1800")) if wait is None else wait, log=log)
        try:
            yield self
        finally:
            self.release()


def gc(bucket: Bucket, grace_s: float = 24 * 3600, dry_run: bool = False, prefix: str = "models/") -> dict:
    """Clean what killed runs leave behind, once older than `grace_s`: unfinished multipart uploads
    (their parts are billed but invisible), and revision prefixes that never got a manifest and are
    not locked by a running stage. Published revisions are never touched."""
    cutoff = time.time() - grace_s
    stale_uploads = [(k, u) for k, u, started in bucket.multipart_uploads(prefix) if started < cutoff]
    objects = bucket.listing(prefix)
    revisions: dict[tuple[str, str], list[str]] = {}
    for key in objects:
        parts = key[len("models/"):].split("/")
        if len(parts) >= 4:
            revisions.setdefault(("/".join(parts[:2]), parts[2]), []).append(key)
    published = {k for k in bucket.listing("manifests/") if "/revisions/" in k}
    locked = set(bucket.listing("locks/"))
    orphans = {}
    for (name, rev), keys in revisions.items():
        if manifest_key(name, rev) in published or lock_key(name, rev) in locked:
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
    """One row per stored vLLM compile cache (see tasks/compile_cache.py)."""
    objects = bucket.listing("compile-cache/")
    rows = []
    for key in sorted(k for k in objects if k.endswith("/manifest.json")):
        cache_key = key.split("/")[1]
        manifest = bucket.get_json(key) or {}
        files = manifest.get("files", [])
        rows.append({"key": cache_key, "files": len(files), "bytes": sum(f["size"] for f in files),
                     "saved_at": datetime.fromtimestamp(manifest.get("saved_at", 0), timezone.utc).isoformat(timespec="seconds"),
                     "stored_bytes": sum(o.size for k, o in objects.items() if k.startswith(f"compile-cache/{cache_key}/"))})
    return rows


def drop_compile_caches(bucket: Bucket, older_than_s: float, dry_run: bool = False) -> list[str]:
    """Delete compile caches saved more than `older_than_s` ago (manifest first, so none is half-restored)."""
    cutoff = time.time() - older_than_s
    stale = [r["key"] for r in compile_caches(bucket)
             if datetime.fromisoformat(r["saved_at"]).timestamp() < cutoff]
    if not dry_run:
        for key in stale:
            bucket.delete([f"compile-cache/{key}/manifest.json"])
            bucket.delete(list(bucket.listing(f"compile-cache/{key}/")))
    return stale
