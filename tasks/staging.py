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
import threading
import time
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from modelferry.tasks import catalog, hub
from modelferry.tasks import transfer as transfer_
from modelferry.tasks.bucket import Bucket, ObjectInfo
from modelferry.tasks.errors import IntegrityError, SourceError
from modelferry.tasks.integrity import (FileEntry, FileHashes, Manifest, check_key_length, check_relpath, hash_file, local_revision,
                             part_size_for)
from modelferry.tasks.settings import Settings

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
    stat: list[int] | None = None  # a local file's identity when resolve hashed it


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
        entries = {str(f.local): {**asdict(f.hashes), "part_size": plan.part_size, "stat": f.stat}
                   for f in plan.files if f.hashes and f.stat}
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
    files = [PlanFile(rel, sizes[rel], local=p) for rel, p in found]

    def hashed(f: PlanFile) -> PlanFile:
        f.stat = _identity(f.local)
        entry = hc.get(str(f.local))
        if entry and entry.get("stat") == f.stat:
            f.hashes = _cached_hashes(entry, f, part_size)
        if f.hashes is None:  # sha256 only: the ETag's MD5 is taken later, while earlier files upload
            f.hashes = hash_file(f.local, part_size, _hash_progress(f.path, f.size), git=False, etag_styles=set())
            if _identity(f.local) != f.stat:
                raise SourceError(f"{f.path} changed while it was being hashed: stage it once it is written")
        f.sha256 = f.hashes.sha256
        return f

    with ThreadPoolExecutor(2, thread_name_prefix="hash") as pool:  # hashlib releases the GIL: two cores
        list(pool.map(hashed, sorted(files, key=lambda f: -f.size)))
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
    if not sha or not (meta.get("mf-md5") or meta.get("mf-multipart")) or (f.sha256 and sha != f.sha256):
        return None
    if not f.sha256 and meta.get("mf-git-sha1") != f.git_sha1:
        return None
    return FileHashes(f.size, sha, meta.get("mf-git-sha1", ""), meta.get("mf-md5", ""), meta.get("mf-multipart") or None)


def object_metadata(h: FileHashes) -> tuple[tuple[str, str], ...]:
    meta = [("mf-sha256", h.sha256), ("mf-md5", h.md5), ("mf-git-sha1", h.git_sha1), ("mf-multipart", h.multipart_etag)]
    return tuple((k, v) for k, v in meta if v)


def _holds(obj: ObjectInfo | None, f: PlanFile) -> bool:
    """Whether the bucket's object is proven to hold `f`: its size, and the ETag the bucket computed
    matching one our hashes predict."""
    return bool(obj and f.hashes and obj.size == f.size and obj.etag in f.hashes.etags())


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
        if _holds(obj, f):
            f.proven, f.etag = True, obj.etag
    plan.unexpected = sorted(k[len(plan.prefix):] for k in listing if k not in wanted)
    # Left by an interrupted run whose ETag hashes this machine doesn't have: ask the objects (HEADs).
    unknown = [f for f in plan.files if not f.proven and not (f.hashes and f.hashes.etags())
               and (o := listing.get(plan.prefix + f.path)) and o.size == f.size]
    if unknown:
        with ThreadPoolExecutor(16) as pool:
            metas = list(pool.map(lambda f: bucket.head_metadata(plan.prefix + f.path), unknown))
        for f, meta in zip(unknown, metas):
            h = _hashes_from_metadata(meta, f)
            etag = listing[plan.prefix + f.path].etag
            if h and etag in h.etags():
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


# --- transfer: download -> local_verify -> upload, per file and overlapped -------------------

STEP_NAMES = ("download", "local_verify", "upload")


class _Span:
    """Wall time from a step's first piece of work to its last (steps overlap in the pipeline)."""

    def __init__(self):
        self.start: float | None = None
        self.end = 0.0
        self.lock = threading.Lock()

    def __enter__(self):
        with self.lock:
            self.start = time.perf_counter() if self.start is None else self.start

    def __exit__(self, *exc):
        with self.lock:
            self.end = max(self.end, time.perf_counter())

    @property
    def seconds(self) -> float:
        return round(self.end - self.start, 3) if self.start is not None else 0.0


def transfer(settings: Settings, plan: Plan, progress=None, replace: bool = False,
             keep_downloads: bool = True) -> list[StepStats]:
    """Move every pending file into the bucket, each through download (Hub only), hashing against
    the source's hashes, and upload, pipelined: while one file uploads the next is downloaded or
    hashed. A file is uploaded only after its own bytes matched the Hub's sha256 (or git blob id);
    a local file only while it is unchanged since resolve hashed it. Each uploaded object is then
    proven by its ETag (one HEAD) against the MD5 taken in the same read as the check.

    Returns the rows of download, local_verify and upload, each timed from its first to its last
    piece of work. Raises the first error met; its `step` attribute names the step it belongs to.
    Files proven before a failure stay proven: a re-run does not send them again. With
    `keep_downloads=False` each Hub file is deleted once proven in the bucket (a shard worker's disk
    then holds only the files in flight)."""
    bucket = Bucket(settings)
    rows = {name: StepStats(name) for name in STEP_NAMES}
    spans = {name: _Span() for name in STEP_NAMES}
    rows["upload"].copied = prepare(bucket, plan, replace)
    if rows["upload"].copied:
        rows["upload"].note = "unchanged files copied in bucket"
    todo = sorted(plan.to_fetch(), key=lambda f: -f.size)  # big files first: they set the pace
    if not plan.is_hub:
        rows["download"].status, rows["download"].note = "skipped", "local source"
    if not todo:
        if plan.is_hub:
            rows["download"].status, rows["download"].note = "skipped", "nothing to fetch"
        rows["local_verify"].status, rows["local_verify"].note = "skipped", "all proven in bucket"
        if not rows["upload"].copied:
            rows["upload"].status, rows["upload"].note = "skipped", "0 bytes sent: all proven in bucket"
        return list(rows.values())
    if plan.is_hub:
        _check_disk(plan, todo)  # its error belongs to download
    styles = catalog.etag_styles(bucket)
    total = sum(f.size for f in todo)
    counts = {"downloaded": 0, "down_bytes": 0, "uploaded": 0, "up_bytes": 0}
    count_lock, submit_lock = threading.Lock(), threading.Lock()
    failures: list[BaseException] = []
    bad: list[str] = []
    stop = threading.Event()
    proofs = ThreadPoolExecutor(4, thread_name_prefix="prove")
    proof_futures = []

    def prove(f: PlanFile) -> None:
        with spans["upload"]:
            obj = bucket.head(plan.prefix + f.path)
            if _holds(obj, f):
                f.proven, f.etag = True, obj.etag
                if plan.is_hub and not keep_downloads:
                    f.local.unlink(missing_ok=True)
                if len(styles) > 1 and (style := catalog.learn_etag_style(bucket, f.hashes, obj.etag)):
                    styles.intersection_update({style})

    def uploaded(item: transfer_.Upload) -> None:
        f = by_key[item.key]
        with count_lock:
            counts["uploaded"] += 1
            counts["up_bytes"] += item.size
            n, sent = counts["uploaded"], counts["up_bytes"]
        log.info("upload %d/%d files, %.1f/%.1f MB: %s", n, len(todo), sent / 1e6, total / 1e6, f.path)
        if progress:
            progress(100.0 * sent / total if total else 100.0)
        proof_futures.append(proofs.submit(prove, f))

    by_key = {plan.prefix + f.path: f for f in todo}

    def one_file(f: PlanFile, uploader: transfer_.Uploader) -> None:
        if stop.is_set():
            return
        step = "download"
        try:
            if plan.is_hub:
                with spans["download"]:
                    _fetch(settings, plan, f, counts, count_lock, len(todo), total)
            step = "local_verify"
            with spans["local_verify"]:
                problem = _check(plan, f, styles)
            if problem:
                bad.append(problem)
                return
            step = "upload"
            with submit_lock, spans["upload"]:
                uploader.submit(transfer_.Upload(f.local, plan.prefix + f.path, f.size, object_metadata(f.hashes)))
        except IntegrityError as exc:
            bad.append(f"{f.path} ({exc})")
        except BaseException as exc:
            exc.step = step
            failures.append(exc)
            stop.set()

    # Two at a time: on a shared link, N parallel downloads finish their first file N times later,
    # and the upload waits for that first file. Raise it where each connection is slow on its own.
    workers = int(os.environ.get("MODELFERRY_DOWNLOAD_WORKERS", "2")) if plan.is_hub else 2
    try:
        with transfer_.Uploader(settings, plan.part_size, on_done=uploaded) as uploader:
            with ThreadPoolExecutor(workers, thread_name_prefix="ferry") as pool:
                list(pool.map(lambda f: one_file(f, uploader), todo))
            with spans["upload"]:
                sent = uploader.close()
        for fut in proof_futures:
            fut.result()
    except Exception as exc:  # noqa: BLE001 - an error met first in a worker is the one to report
        if not failures:
            exc.step = "upload"
            failures.append(exc)
    finally:
        proofs.shutdown(wait=True)
        _save_hash_cache(plan)
    for name in STEP_NAMES:
        rows[name].seconds = spans[name].seconds
    rows["download"].files, rows["download"].bytes = counts["downloaded"], counts["down_bytes"]
    rows["local_verify"].files = len(todo) - len(bad)
    rows["local_verify"].note = "hashes match the source" if plan.is_hub else "unchanged since hashed"
    rows["upload"].files = counts["uploaded"]
    if failures:
        raise failures[0]
    if bad:
        raise _bad_files(bad)
    rows["upload"].bytes = sent
    return list(rows.values())


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
    """A copy of `plan` for one worker: only `files`, and nothing that can't travel (the lock)."""
    return dataclasses.replace(plan, files=files, lock=None, published=None, unexpected=[])


def on_this_machine(part: Plan) -> Plan:
    """A shard as its worker runs it: Hub downloads go to this machine's cache."""
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


def _bad_files(bad: list[str]) -> IntegrityError:
    exc = IntegrityError(f"{len(bad)} file(s) do not match the source's hashes, not uploaded, nothing published: "
                         + "; ".join(sorted(bad)), sorted(b.split(" (")[0] for b in bad))
    exc.step = "local_verify"
    return exc


def prepare(bucket: Bucket, plan: Plan, replace: bool) -> int:
    """What happens once per stage before files move: objects under the prefix that the plan doesn't
    name go when the revision is unpublished (left by an interrupted run) or --replace, and files
    unchanged since the current revision are copied inside the bucket. Returns the copies made."""
    if plan.unexpected and (plan.published is None or replace):
        bucket.delete([plan.prefix + p for p in plan.unexpected])
        log.info("removed %d stray object(s) under %s", len(plan.unexpected), plan.prefix)
        plan.unexpected = []
    copies = [f for f in plan.pending() if f.copy_from]
    if not copies:
        return 0

    def copy_and_prove(f: PlanFile) -> bool:
        bucket.copy(f.copy_from, plan.prefix + f.path, f.size, plan.part_size)
        obj = bucket.head(plan.prefix + f.path)
        if _holds(obj, f):
            f.proven, f.etag = True, obj.etag
            return True
        # The server formed the copy's ETag in a way the recorded hashes don't predict: send the file.
        log.warning("the copy of %s shows ETag %s, which its recorded hashes don't predict: sending it instead",
                    f.path, obj.etag if obj else None)
        f.copy_from, f.hashes = None, (FileHashes(f.size, f.sha256, "", "", None) if f.stat else None)
        return False

    with ThreadPoolExecutor(8) as pool:
        copied = sum(pool.map(copy_and_prove, copies))
    log.info("copied %d unchanged file(s) inside the bucket", copied)
    return copied


def _check_disk(plan: Plan, todo: list[PlanFile]) -> None:
    plan.cache_dir.mkdir(parents=True, exist_ok=True)
    free = _free_bytes(plan.cache_dir)
    missing = sum(f.size - _present(plan.cache_dir / f.path, f.size) for f in todo)  # a retry resumes
    if free < missing:
        exc = SourceError(f"not enough space in {plan.cache_dir}: need {missing / 1e9:.2f} GB, "
                          f"{free / 1e9:.2f} GB free; set MODELFERRY_CACHE to a bigger disk")
        exc.step = "download"
        raise exc


def _fetch(settings: Settings, plan: Plan, f: PlanFile, counts: dict, lock, n_files: int, total: int) -> None:
    had = _present(plan.cache_dir / f.path, f.size)
    f.local = hub.download(plan.source["repo_id"], plan.revision, f.path, plan.cache_dir,
                           settings.hf_token, settings.hf_endpoint)
    with lock:
        counts["downloaded"] += 1
        counts["down_bytes"] += f.size - had
        n, got = counts["downloaded"], counts["down_bytes"]
    log.info("download %d/%d files, %.1f/%.1f MB: %s", n, n_files, got / 1e6, total / 1e6, f.path)


def _check(plan: Plan, f: PlanFile, styles: set[str]) -> str | None:
    """Hash `f` for what its upload must be proven against. Returns why it may not go up, or None."""
    if not plan.is_hub:
        if f.hashes and f.hashes.etags() and _identity(f.local) == f.stat:
            return None
        h = hash_file(f.local, plan.part_size, _hash_progress(f.path, f.size), sha256=False, git=False,
                      etag_styles=styles)
        if _identity(f.local) != f.stat:  # the MD5 read and resolve's sha256 read must see the same bytes
            return f"{f.path} (changed since resolve hashed it)"
        f.hashes = FileHashes(f.size, f.sha256, "", h.md5, h.multipart_etag)
        return None
    h = hash_file(f.local, plan.part_size, _hash_progress(f.path, f.size), git=not f.sha256, etag_styles=styles)
    if f.sha256 and h.sha256 != f.sha256:
        problem = f"{f.path} (sha256 {h.sha256[:12]}... != Hub {f.sha256[:12]}...)"
    elif not f.sha256 and f.git_sha1 and h.git_sha1 != f.git_sha1:
        problem = f"{f.path} (git sha1 {h.git_sha1[:12]}... != Hub {f.git_sha1[:12]}...)"
    else:
        f.hashes, f.sha256 = h, h.sha256
        return None
    f.local.unlink(missing_ok=True)
    return problem


def _present(path: Path, size: int) -> int:
    """Bytes of `path` already on disk (a complete file, or none: partial downloads live elsewhere)."""
    return size if path.is_file() and path.stat().st_size == size else 0


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


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
