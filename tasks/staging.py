"""The steps of staging one model, as plain functions over a `Plan`:

    resolve -> download -> local_verify -> upload -> remote_verify -> publish

Each returns a `StepStats`; `flows/stage_model.py` wraps them as Prefect tasks with retries.
A file already proven in the bucket (its ETag matches hashes we took from verified bytes, known from
the published manifest or the local hash cache) is neither downloaded, hashed nor uploaded again:
that is what makes an unchanged re-stage send 0 bytes and an interrupted one resume.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tasks import catalog, hub, transfer
from tasks.bucket import Bucket
from tasks.errors import IntegrityError, SourceError
from tasks.integrity import (FileEntry, FileHashes, Manifest, check_key_length, check_relpath, etag_forms, hash_file,
                             local_revision, part_size_for)
from tasks.settings import Settings

log = logging.getLogger("modelferry.stage")

SKIP_DIRS = {".git", ".cache", "__pycache__", ".huggingface"}


def cache_root() -> Path:
    return Path(os.environ.get("MODELFERRY_CACHE") or Path.home() / ".cache" / "modelferry")


@dataclass
class PlanFile:
    path: str
    size: int
    sha256: str | None = None  # expected: the Hub's LFS sha256, or ours for a local source
    git_sha1: str | None = None  # expected git blob id (Hub files kept in git)
    local: Path | None = None
    hashes: FileHashes | None = None
    proven: bool = False  # already in the bucket with the right ETag
    etag: str = ""
    copy_from: str | None = None  # key of the same content under another published revision


@dataclass
class Plan:
    name: str
    revision: str
    source: dict
    files: list[PlanFile]
    part_size: int
    cache_dir: Path
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    license: str | None = None
    gated: bool | str = False
    published: Manifest | None = None
    unexpected: list[str] = field(default_factory=list)  # objects under the prefix not in this plan
    lock: catalog.Lock | None = None  # held from resolve until the flow ends

    @property
    def prefix(self) -> str:
        return catalog.model_prefix(self.name, self.revision)

    @property
    def is_hub(self) -> bool:
        return self.source["kind"] == "hub"

    def pending(self) -> list[PlanFile]:
        return [f for f in self.files if not f.proven]

    def to_fetch(self) -> list[PlanFile]:
        """Pending files whose bytes must come from the source (not copied inside the bucket)."""
        return [f for f in self.pending() if not f.copy_from]


@dataclass
class StepStats:
    step: str
    status: str = "completed"  # completed | skipped | failed
    seconds: float = 0.0
    files: int = 0
    bytes: int = 0
    mb_per_s: float | None = None
    attempts: int = 1
    copied: int = 0  # objects copied inside the bucket instead of sent
    note: str = ""

    def row(self) -> dict:
        return asdict(self)


def _hash_progress(path: str, size: int, every_s: float = 5.0):
    """Log hashing progress of a big file every few seconds (small files say nothing)."""
    state = {"done": 0, "last": time.monotonic()}

    def report(n: int) -> None:
        state["done"] += n
        now = time.monotonic()
        if now - state["last"] >= every_s:
            state["last"] = now
            log.info("hashing %s: %.1f/%.1f GB", path, state["done"] / 1e9, size / 1e9)

    return report


def release(plan: Plan | None) -> None:
    """Give up the revision's lock (idempotent)."""
    if plan is not None and plan.lock is not None:
        plan.lock.release()
        plan.lock = None


# --- the local hash cache: hashes taken from verified bytes, reused across runs ------------------

def _hash_cache_path(cache_dir: Path) -> Path:
    return cache_dir.with_name(cache_dir.name + ".hashes.json")


def _load_hash_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save_hash_cache(plan: Plan) -> None:
    """Merge the plan's hashes into its cache: a Hub file by its path (checked against the Hub's
    hashes on reuse), a local file by its absolute path with the stat that must still hold."""
    if plan.is_hub:
        entries = {f.path: {**asdict(f.hashes), "part_size": plan.part_size}
                   for f in plan.files if f.hashes and f.local and f.local.exists()}
    else:
        entries = {str(f.local): {**asdict(f.hashes), "part_size": plan.part_size, "stat": _identity(f.local)}
                   for f in plan.files}
    path = _hash_cache_path(plan.cache_dir)
    data = _load_hash_cache(path)
    data.update(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def _cached_hashes(entry: dict | None, f: PlanFile, part_size: int) -> FileHashes | None:
    """Cached hashes for `f` when they describe the same content and part size."""
    if not entry or entry.get("part_size") != part_size or entry.get("size") != f.size:
        return None
    if f.sha256 and entry.get("sha256") != f.sha256:
        return None
    if not f.sha256 and f.git_sha1 and entry.get("git_sha1") != f.git_sha1:
        return None
    return FileHashes(entry["size"], entry["sha256"], entry["git_sha1"], entry["md5"], entry["multipart_etag"])


# --- resolve ---------------------------------------------------------------------------------

def _check_loadable(paths: list[str], allow_unloadable: bool) -> None:
    if allow_unloadable:
        return
    problems = []
    if "config.json" not in paths:
        problems.append("no config.json")
    if not any(p.endswith(".safetensors") for p in paths):
        weights = [p for p in paths if p.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        problems.append("weights are not safetensors" + (f" ({weights[0]}...)" if weights else " (none found)"))
    if problems:
        raise SourceError(f"vLLM could not load this: {'; '.join(problems)}. Pass --allow-unloadable to stage it anyway")


def _walk_local(root: Path, include: list[str], exclude: list[str]) -> list[tuple[str, Path]]:
    if not root.is_dir():
        raise SourceError(f"{root} is not a directory")
    found = []
    try:
        for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            for name in sorted(filenames):
                path = Path(dirpath) / name
                rel = path.relative_to(root).as_posix()
                if include and not any(fnmatch.fnmatch(rel, g) for g in include):
                    continue
                if any(fnmatch.fnmatch(rel, g) for g in exclude):
                    continue
                if path.is_symlink() and not path.resolve().is_relative_to(root.resolve()):
                    raise SourceError(f"{rel} links outside {root}: copy the file in instead")
                found.append((check_relpath(rel), path))
    except PermissionError as exc:
        raise SourceError(f"cannot read {exc.filename}: permission denied") from None
    if not found:
        what = "is empty" if not include and not exclude else f"has no file matching include={include} exclude={exclude}"
        raise SourceError(f"{root} {what}")
    return found


def _raise(exc: OSError):
    raise exc


def resolve(settings: Settings, source: str, revision: str | None, include: list[str], exclude: list[str],
            name: str | None, allow_unloadable: bool = False, replace: bool = False) -> tuple[Plan, StepStats]:
    """Work out what to stage: the exact revision, its files with expected hashes, and which of
    them the bucket already holds intact (one listing)."""
    stats = StepStats("resolve")
    path = Path(source).expanduser()
    if path.exists():
        plan = _resolve_local(path, name, include, exclude)
    else:
        plan = _resolve_hub(settings, source, revision, include, exclude, name)
    _check_loadable([f.path for f in plan.files], allow_unloadable)
    for f in plan.files:
        check_key_length(plan.prefix + f.path)
    if plan.gated:
        log.warning("%s is gated on the Hub (%s): its copy in bucket %s is readable by anyone holding the bucket's keys",
                    plan.name, plan.gated, settings.bucket)
    bucket = Bucket(settings)
    plan.lock = catalog.Lock(bucket, plan.name, plan.revision)  # one writer per revision, until the flow ends
    plan.lock.acquire(wait=float(os.environ.get("MODELFERRY_LOCK_WAIT_S", "1800")), log=log)
    try:
        plan.published = catalog.read_manifest(bucket, plan.name, plan.revision)
        if plan.published and not replace and (plan.published.include, plan.published.exclude) != (include, exclude):
            raise SourceError(
                f"{plan.name}@{plan.revision} is already staged with include={plan.published.include} "
                f"exclude={plan.published.exclude}; pass --replace to restage it with include={include} exclude={exclude}")
        # We hold the lock, so any unfinished multipart upload here is a killed run's: abort it.
        for key, upload_id, _ in bucket.multipart_uploads(plan.prefix):
            bucket.abort_upload(key, upload_id)
            log.info("aborted an unfinished multipart upload of %s", key[len(plan.prefix):])
        _mark_proven(plan, bucket.listing(plan.prefix), bucket)
        _plan_copies(plan, bucket)
    except BaseException:
        release(plan)
        raise
    stats.files = len(plan.files)
    copies = len(plan.pending()) - len(plan.to_fetch())
    stats.note = f"@{plan.revision[:12]}, {len(plan.files) - len(plan.pending())} already in bucket" + (
        f", {copies} to copy from @{_rev_of(plan)}" if copies else "")
    return plan, stats


def _resolve_hub(settings, repo_id, revision, include, exclude, name) -> Plan:
    resolved = hub.resolve(repo_id, revision, include, exclude, settings.hf_token, settings.hf_endpoint)
    cache_dir = cache_root() / "hub" / repo_id / resolved.commit
    files = [PlanFile(f.path, f.size, f.sha256, None if f.lfs else f.git_sha1) for f in resolved.files]
    return Plan(name or repo_id, resolved.commit, {"kind": "hub", "repo_id": repo_id, "requested": revision or "main"},
                files, part_size_for(max(f.size for f in files)), cache_dir, include, exclude,
                resolved.license, resolved.gated)


def _resolve_local(root: Path, name: str | None, include, exclude) -> Plan:
    if not name:
        raise SourceError(f"{root} is a local directory: pass --name org/name to say what to call it")
    if name.count("/") != 1 or not all(name.split("/")):
        raise SourceError(f"--name {name!r} must look like org/name")
    check_relpath(name)
    found = _walk_local(root.resolve(), include, exclude)
    sizes = {rel: p.stat().st_size for rel, p in found}
    part_size = part_size_for(max(sizes.values()))
    cache_dir = cache_root() / "local" / name / "_"
    hc = _load_hash_cache(_hash_cache_path(cache_dir))
    files = []
    for rel, p in found:
        f = PlanFile(rel, sizes[rel], local=p)
        entry = hc.get(str(p))
        if entry and entry.get("stat") == _identity(p):
            f.hashes = _cached_hashes(entry, f, part_size)
        if f.hashes is None:
            before = _identity(p)
            f.hashes = hash_file(p, part_size, progress=_hash_progress(rel, sizes[rel]))
            if _identity(p) != before:
                raise SourceError(f"{rel} changed while it was being hashed: stage it once it is written")
        f.sha256, f.git_sha1 = f.hashes.sha256, f.hashes.git_sha1
        files.append(f)
    revision = local_revision([(f.path, f.size, f.sha256) for f in files])
    plan = Plan(name, revision, {"kind": "local", "path": str(root.resolve())}, files, part_size, cache_dir,
                include, exclude)
    _save_hash_cache(plan)
    return plan


def _identity(path: Path) -> list[int]:
    """What must be unchanged for cached hashes to still describe the file: a copy over it with the
    same size and mtime (cp -p, tar x) still changes the inode or the ctime."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _hashes_from_metadata(meta: dict[str, str], f: PlanFile) -> FileHashes | None:
    """Hashes an earlier run of ours recorded on the object when it uploaded verified bytes. They
    are only a claim: the ETag the bucket computed must still match them to prove anything."""
    sha = meta.get("mf-sha256")
    if not sha or not meta.get("mf-md5") or (f.sha256 and sha != f.sha256):
        return None
    if not f.sha256 and meta.get("mf-git-sha1") != f.git_sha1:
        return None
    return FileHashes(f.size, sha, meta.get("mf-git-sha1", ""), meta["mf-md5"], meta.get("mf-multipart") or None)


def object_metadata(h: FileHashes) -> tuple[tuple[str, str], ...]:
    meta = [("mf-sha256", h.sha256), ("mf-md5", h.md5), ("mf-git-sha1", h.git_sha1)]
    if h.multipart_etag:
        meta.append(("mf-multipart", h.multipart_etag))
    return tuple(meta)


def _mark_proven(plan: Plan, listing, bucket: Bucket) -> None:
    known = {f.path: f for f in plan.published.files} if plan.published else {}
    hc = _load_hash_cache(_hash_cache_path(plan.cache_dir)) if plan.is_hub else {}
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
                f.hashes = _cached_hashes(hc.get(f.path), f, plan.part_size)
        obj = listing.get(key)
        if f.hashes and obj and obj.size == f.size and obj.etag in etag_forms(f.hashes.md5, f.hashes.multipart_etag):
            f.proven, f.etag = True, obj.etag
    plan.unexpected = sorted(k[len(plan.prefix):] for k in listing if k not in wanted)
    # Left by an interrupted run whose hashes this machine doesn't have: ask the objects (HEADs).
    unknown = [f for f in plan.files if f.hashes is None and (o := listing.get(plan.prefix + f.path)) and o.size == f.size]
    if unknown:
        with ThreadPoolExecutor(16) as pool:
            metas = list(pool.map(lambda f: bucket.head_metadata(plan.prefix + f.path), unknown))
        for f, meta in zip(unknown, metas):
            h = _hashes_from_metadata(meta, f)
            etag = listing[plan.prefix + f.path].etag
            if h and etag in etag_forms(h.md5, h.multipart_etag):
                f.hashes, f.proven, f.etag = h, True, etag


def _rev_of(plan: Plan) -> str:
    src = next(f.copy_from for f in plan.files if f.copy_from)
    return src[len(f"models/{plan.name}/"):].split("/", 1)[0][:12]


def _plan_copies(plan: Plan, bucket: Bucket) -> None:
    """Files unchanged since the model's current revision are copied inside the bucket, not sent
    again: same content (sha256, or git blob id for small files) and the same part size, so the
    hashes proven for the old object predict the new object's ETag."""
    current = catalog.current_revision(bucket, plan.name)
    if not current or current == plan.revision:
        return
    old = catalog.read_manifest(bucket, plan.name, current)
    if old is None or old.part_size != plan.part_size:
        return
    by_content = {}
    for e in old.files:
        by_content[("sha256", e.sha256, e.size)] = e
        if e.git_sha1:
            by_content[("git", e.git_sha1, e.size)] = e
    for f in plan.pending():
        key = ("sha256", f.sha256, f.size) if f.sha256 else ("git", f.git_sha1, f.size)
        e = by_content.get(key)
        if e:
            f.copy_from = catalog.model_prefix(plan.name, current) + e.path
            f.hashes = FileHashes(e.size, e.sha256, e.git_sha1 or "", e.md5, e.multipart_etag)


# --- download --------------------------------------------------------------------------------

def download(settings: Settings, plan: Plan) -> StepStats:
    """Fetch from the Hub every file not yet proven in the bucket (resuming partial downloads)."""
    stats = StepStats("download")
    todo = plan.to_fetch() if plan.is_hub else []
    if not todo:
        stats.status, stats.note = "skipped", ("local source" if not plan.is_hub else "nothing to fetch")
        return stats
    need = sum(f.size for f in todo)
    plan.cache_dir.mkdir(parents=True, exist_ok=True)
    free = _free_bytes(plan.cache_dir)
    missing = sum(f.size - _present(plan.cache_dir / f.path, f.size) for f in todo)  # a retry resumes
    if free < missing:
        raise SourceError(f"not enough space in {plan.cache_dir}: need {missing / 1e9:.2f} GB, "
                          f"{free / 1e9:.2f} GB free; set MODELFERRY_CACHE to a bigger disk")
    done_bytes = 0
    for i, f in enumerate(todo, 1):
        target = plan.cache_dir / f.path
        had = target.exists() and target.stat().st_size == f.size
        f.local = hub.download(plan.source["repo_id"], plan.revision, f.path, plan.cache_dir,
                               settings.hf_token, settings.hf_endpoint)
        if not had:
            stats.bytes += f.size
        done_bytes += f.size
        log.info("download %d/%d files, %.1f/%.1f MB: %s", i, len(todo), done_bytes / 1e6, need / 1e6, f.path)
    stats.files = len(todo)
    return stats


def _present(path: Path, size: int) -> int:
    """Bytes of `path` already on disk (a complete file, or none: partial downloads live elsewhere)."""
    return size if path.is_file() and path.stat().st_size == size else 0


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# --- local_verify ----------------------------------------------------------------------------

def local_verify(plan: Plan) -> StepStats:
    """Hash each pending file once (sha256, git sha1, part MD5s) and compare with the source's
    hashes. A mismatch stops the run naming every bad file; bad downloads are deleted."""
    stats = StepStats("local_verify")
    todo = plan.to_fetch()
    if not todo:
        stats.status, stats.note = "skipped", "all proven in bucket"
        return stats
    bad = []
    for f in todo:
        if not plan.is_hub:
            st = f.local.stat()
            if st.st_size != f.size:
                bad.append(f"{f.path} (changed since resolve)")
            continue
        f.hashes = hash_file(f.local, plan.part_size, progress=_hash_progress(f.path, f.size), git=not f.sha256)
        if f.sha256 and f.hashes.sha256 != f.sha256:
            bad.append(f"{f.path} (sha256 {f.hashes.sha256[:12]}... != Hub {f.sha256[:12]}...)")
        elif not f.sha256 and f.git_sha1 and f.hashes.git_sha1 != f.git_sha1:
            bad.append(f"{f.path} (git sha1 {f.hashes.git_sha1[:12]}... != Hub {f.git_sha1[:12]}...)")
        else:
            f.sha256 = f.hashes.sha256
            continue
        f.local.unlink(missing_ok=True)
        f.hashes = None
    if plan.is_hub:
        _save_hash_cache(plan)
    if bad:
        raise IntegrityError(f"{len(bad)} file(s) do not match the source's hashes, nothing uploaded: " + "; ".join(bad),
                             [b.split(" (")[0] for b in bad])
    stats.files = len(todo)
    stats.note = "hashes match the source" if plan.is_hub else "unchanged since hashed"
    return stats


# --- upload ----------------------------------------------------------------------------------

def upload(settings: Settings, plan: Plan, progress=None, replace: bool = False) -> StepStats:
    """Upload pending files with s5cmd. Objects under the prefix that the plan doesn't name are
    removed first when the revision is unpublished (left by an interrupted run) or --replace."""
    stats = StepStats("upload")
    bucket = Bucket(settings)
    if plan.unexpected and (plan.published is None or replace):
        bucket.delete([plan.prefix + p for p in plan.unexpected])
        log.info("removed %d stray object(s) under %s", len(plan.unexpected), plan.prefix)
        plan.unexpected = []
    copies = [f for f in plan.pending() if f.copy_from]
    if copies:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda f: bucket.copy(f.copy_from, plan.prefix + f.path, f.size, plan.part_size), copies))
        log.info("copied %d unchanged file(s) inside the bucket", len(copies))
        stats.copied = len(copies)
        stats.note = "unchanged files copied in bucket"
    todo = plan.to_fetch()
    if not todo:
        if not copies:
            stats.status, stats.note = "skipped", "0 bytes sent: all proven in bucket"
        return stats
    total = sum(f.size for f in todo)
    done = {"bytes": 0, "files": 0}

    def on_done(item):
        done["bytes"] += item.size
        done["files"] += 1
        log.info("upload %d/%d files, %.1f/%.1f MB: %s", done["files"], len(todo), done["bytes"] / 1e6, total / 1e6,
                 item.key[len(plan.prefix):])
        if progress:
            progress(100.0 * done["bytes"] / total if total else 100.0)

    items = [transfer.Upload(f.local, plan.prefix + f.path, f.size, object_metadata(f.hashes)) for f in todo]
    stats.bytes = transfer.upload(settings, items, plan.part_size, on_done=on_done, workdir=cache_root() / "tmp")
    stats.files = len(todo)
    return stats


# --- remote_verify ---------------------------------------------------------------------------

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
    stats = StepStats("remote_verify")
    bucket = Bucket(settings)
    manifest = build_manifest(plan, catalog.now())
    check = catalog.compare(manifest, bucket.listing(plan.prefix))
    if not check.ok:
        raise IntegrityError(
            "bucket objects do not match the verified files, nothing published: "
            + "; ".join([f"{p} ({w})" for p, w in check.bad.items()] + [f"{p} (not staged by this run)" for p in check.unexpected]),
            list(check.bad) + check.unexpected)
    for f in manifest.files:
        f.etag = check.observed[f.path]
    stats.files = len(manifest.files)
    stats.note = "all ETags match, 0 bytes read back"
    return manifest, stats


# --- publish ---------------------------------------------------------------------------------

def publish(settings: Settings, plan: Plan, manifest: Manifest, set_current: bool = True) -> StepStats:
    stats = StepStats("publish")
    if plan.published and _same_files(plan.published, manifest):
        stats.status, stats.note = "skipped", "same manifest already published"
        bucket = Bucket(settings)
        stats.bytes = catalog.record_verified(bucket, manifest, by="stage")  # a repaired revision is ok again
        if set_current and catalog.current_revision(bucket, plan.name) != plan.revision:
            stats.bytes += bucket.put_json(catalog.current_key(plan.name), {"revision": plan.revision, "updated_at": catalog.now()})
        return stats
    stats.bytes = catalog.publish(Bucket(settings), manifest, set_current)
    stats.files = 1
    stats.note = "manifest written"
    return stats


def _same_files(a: Manifest, b: Manifest) -> bool:
    key = lambda m: sorted((f.path, f.size, f.sha256, f.etag) for f in m.files)  # noqa: E731
    return key(a) == key(b) and (a.include, a.exclude) == (b.include, b.exclude)
