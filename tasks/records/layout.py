"""Where everything lives in the bucket, and the one writer of each record.

One bucket:
    models/<org>/<name>/<revision>/<files>            what vLLM loads (`s3://bucket/models/.../<revision>/`)
    manifests/<org>/<name>/revisions/<revision>.json  written last, only after remote verification
    manifests/<org>/<name>/verified/<revision>.json   the latest verification, for `list`
    manifests/<org>/<name>/current.json               the revision `launch` uses by default
    locks/<org>/<name>/<revision>.json                who is writing that revision (tasks/records/lock.py)
    modelferry/bucket.json                            what we learned about this bucket (its ETag style)
    bench/<org>/<name>/<bench id>/<file>              benchmark results and their plot
    compile-cache/<key>/...                           vLLM compile caches (tasks/on_node/compile_cache.py)
    .modelferry/probe-<id>                            check-r2's probe object, deleted at once
Manifests live outside the prefix vLLM loads, so a loader listing the weights never sees them, and a
revision without a manifest is never a model here.

Keys are built and parsed here only. Reading a model's records, and judging whether they are intact,
is tasks/records/catalog.py's job.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from modelferry.tasks.on_node import compile_cache
from modelferry.tasks.records.integrity import PARTS, WHOLE, FileHashes, Manifest

if TYPE_CHECKING:  # the bucket imports this module for its probe key
    from modelferry.tasks.clients.bucket import Bucket

MODELS = "models/"
MANIFESTS = "manifests/"
LOCKS = "locks/"
FACTS = "modelferry/"
BUCKET_FACTS = FACTS + "bucket.json"
BENCH = "bench/"
# compile_cache.py runs on the node with the standard library only, so it keeps the spelling.
COMPILE_CACHES = compile_cache.PREFIX + "/"


def now() -> str:
    """The timestamp every record carries: UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def model_prefix(name: str, revision: str) -> str:
    """The prefix vLLM loads a revision from: `models/<org>/<name>/<revision>/`."""
    return f"{MODELS}{name}/{revision}/"


def parse_model_key(key: str) -> tuple[str, str, str] | None:
    """(name, revision, path) of an object under a revision's prefix, None for any other key."""
    parts = key.removeprefix(MODELS).split("/", 3) if key.startswith(MODELS) else []
    return ("/".join(parts[:2]), parts[2], parts[3]) if len(parts) == 4 and all(parts[:3]) else None


def revisions_prefix(name: str) -> str:
    return f"{MANIFESTS}{name}/revisions/"


def manifest_key(name: str, revision: str) -> str:
    return f"{revisions_prefix(name)}{revision}.json"


def parse_manifest_key(key: str) -> tuple[str, str] | None:
    """(name, revision) of a published manifest's key, None for any other key."""
    if not (key.startswith(MANIFESTS) and key.endswith(".json")):
        return None
    parts = key[len(MANIFESTS):-len(".json")].split("/")
    return ("/".join(parts[:2]), parts[3]) if len(parts) == 4 and parts[2] == "revisions" and all(parts) else None


def verified_key(name: str, revision: str) -> str:
    return f"{MANIFESTS}{name}/verified/{revision}.json"


def current_key(name: str) -> str:
    return f"{MANIFESTS}{name}/current.json"


def lock_key(name: str, revision: str) -> str:
    return f"{LOCKS}{name}/{revision}.json"


def bench_root(model: str) -> str:
    """Where a model's benchmarks go, one folder each: `bench/<org>/<name>/`."""
    return f"{BENCH}{model}/"


def bench_prefix(model: str, bench_id: str) -> str:
    """Where one benchmark's results go: `bench/<org>/<name>/<bench id>/`."""
    return f"{bench_root(model)}{bench_id}/"


def compile_cache_prefix(key: str) -> str:
    return f"{COMPILE_CACHES}{key}/"


def compile_cache_manifest_key(key: str) -> str:
    """Written last by the node's saver: a cache without it is never restored."""
    return compile_cache_prefix(key) + "manifest.json"


def parse_compile_cache_manifest_key(key: str) -> str | None:
    """The cache key of a compile cache's manifest, None for any other key."""
    parts = key.removeprefix(COMPILE_CACHES).split("/") if key.startswith(COMPILE_CACHES) else []
    return parts[0] if len(parts) == 2 and parts[0] and parts[1] == "manifest.json" else None


def probe_key() -> str:
    """A fresh key for check-r2's probe, outside every prefix above."""
    return f".modelferry/probe-{uuid.uuid4().hex}"


def put_manifest(bucket: Bucket, manifest: Manifest) -> int:
    """Publish `manifest`: from now on its revision is a model. Returns bytes written."""
    return bucket.put_json(manifest_key(manifest.name, manifest.revision), manifest.to_json())


def put_current(bucket: Bucket, name: str, revision: str) -> int:
    """Point `name`'s current revision at `revision`. Returns bytes written."""
    return bucket.put_json(current_key(name), {"revision": revision, "updated_at": now()})


def verification_record(manifest: Manifest, bad: dict[str, str] | None = None, unexpected: list[str] | None = None,
                        deep: bool = False, by: str | None = None) -> dict:
    """What a check of `manifest`'s objects found (no `bad` and no `unexpected`: every object proven)."""
    bad, unexpected = bad or {}, unexpected or []
    record = {"name": manifest.name, "revision": manifest.revision, "ok": not bad and not unexpected, "deep": deep,
              "checked_at": now(), "files": len(manifest.files), "bytes": manifest.total_bytes, "bad": bad,
              "unexpected": unexpected}
    return {**record, "by": by} if by else record


def put_verified(bucket: Bucket, record: dict) -> int:
    """Store a `verification_record` as its revision's latest, for `list`. Returns bytes written."""
    return bucket.put_json(verified_key(record["name"], record["revision"]), record)


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
