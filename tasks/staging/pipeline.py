"""Steps download -> local_verify -> upload, per file and overlapped: while one file uploads the next
is downloaded or hashed. A file goes up only after its own bytes matched the Hub's sha256 (or git
blob id), or, from a local checkpoint, while it is unchanged since `resolve` hashed it. Each
uploaded object is then proven by its ETag (one HEAD) against the MD5 taken in the same read.

Hub files come from the user's Hugging Face cache (HF_HOME / HF_HUB_CACHE): one already there, put
by any HF tool, is not downloaded again but still checked against the Hub's sha256. Nothing in that
cache is ever deleted. A Dask worker fetches into modelferry's own cache instead and deletes each
file once it is proven in the bucket."""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from modelferry.tasks.clients import hub
from modelferry.tasks.records import layout
from modelferry.tasks.staging import hash_cache
from modelferry.tasks.clients import transfer as s5cmd
from modelferry.tasks.clients.bucket import Bucket
from modelferry.tasks.errors import HubError, IntegrityError, ModelferryError, SourceError, TransferError, first_line
from modelferry.tasks.records.integrity import FileHashes, hash_file
from modelferry.tasks.staging.plan import Plan, PlanFile, StepStats, cache_root, holds
from modelferry.tasks.settings import Settings, read
from modelferry.tasks.staging.survey import object_metadata

log = logging.getLogger("modelferry.stage")

STEP_NAMES = ("download", "local_verify", "upload")
# What an error that isn't ours becomes in each step: fetching from the Hub, reading the source, s5cmd.
STEP_ERRORS = {"download": HubError, "local_verify": SourceError, "upload": TransferError}


def in_step(exc: BaseException, step: str) -> BaseException:
    """`exc` as a typed error of `step`. Ours keep their type and the step first named on them; any
    other Exception becomes the step's error from it, transient only when it said so itself (a step
    is retried only on a transient error: a bug must not be). Ctrl-C and exits pass unchanged."""
    if isinstance(exc, ModelferryError):
        exc.step = exc.step or step
        return exc
    if not isinstance(exc, Exception):
        return exc
    typed = STEP_ERRORS[step](f"{type(exc).__name__}: {first_line(exc)}")
    typed.step, typed.transient = step, bool(getattr(exc, "transient", False))
    typed.__cause__ = exc
    return typed


def transfer(settings: Settings, plan: Plan, progress=None, keep_downloads: bool = True,
             copied: int = 0) -> list[StepStats]:
    """Send every file of `plan` still to fetch. Returns the rows of download, local_verify and
    upload, each timed from its first to its last piece of work (`copied`: files `in_bucket`
    copied, for the upload row). Raises the first error met, a ModelferryError whose `step` names
    the step it belongs to (Ctrl-C stays KeyboardInterrupt). Files proven before a failure stay
    proven: a re-run does not send them again.
    `keep_downloads=False` (a Dask worker): Hub files are fetched into modelferry's own cache and
    each is deleted once proven."""
    rows = {name: StepStats(name) for name in STEP_NAMES}
    rows["upload"].copied = copied
    if copied:
        rows["upload"].note = "unchanged files copied in bucket"
    todo = sorted(plan.to_fetch(), key=lambda f: -f.size)  # big files first: they set the pace
    if not plan.is_hub:
        rows["download"].status, rows["download"].note = "skipped", "local source"
    if not todo:
        if plan.is_hub:
            rows["download"].status, rows["download"].note = "skipped", "nothing to fetch"
        rows["local_verify"].status, rows["local_verify"].note = "skipped", "all proven in bucket"
        if not copied:
            rows["upload"].status, rows["upload"].note = "skipped", "0 bytes sent: all proven in bucket"
        return list(rows.values())
    fetch = Fetch(settings, plan, keep_downloads) if plan.is_hub else None
    if fetch:
        fetch.check_disk(todo)
    run = _Run(Bucket(settings), plan, todo, fetch, progress)
    try:
        run.go(settings)
    finally:
        run.fill(rows)
        hash_cache.save(plan)
    return list(rows.values())


class Fetch:
    """Where a plan's Hub files come from: the user's HF cache (downloaded into it when missing),
    or on a worker that keeps nothing, modelferry's own cache."""

    def __init__(self, settings: Settings, plan: Plan, keep_downloads: bool):
        self.settings, self.plan = settings, plan
        self.own_cache = None if keep_downloads else cache_root() / "hf"

    def cached(self, f: PlanFile) -> Path | None:
        return hub.cached(self.plan.source["repo_id"], self.plan.revision, f.path)

    def check_disk(self, todo: list[PlanFile]) -> None:
        """Refuse when the download cache can't hold what is really missing from it."""
        where = self.own_cache or hub.cache_dir()
        where.mkdir(parents=True, exist_ok=True)
        missing = sum(f.size for f in todo if self.cached(f) is None)
        st = os.statvfs(where)
        free = st.f_bavail * st.f_frsize
        if free < missing:
            setting = "MODELFERRY_CACHE" if self.own_cache else "HF_HUB_CACHE (or HF_HOME)"
            exc = SourceError(f"not enough space in {where}: need {missing / 1e9:.2f} GB, "
                              f"{free / 1e9:.2f} GB free; set {setting} to a bigger disk")
            exc.step = "download"
            raise exc

    def get(self, f: PlanFile) -> int:
        """Put `f`'s bytes on this machine (f.local). Returns the bytes downloaded (0: cached)."""
        found = self.cached(f)
        if found is not None:
            f.local, f.ours = found, False
            return 0
        f.local = hub.download(self.plan.source["repo_id"], self.plan.revision, f.path, self.own_cache,
                               self.settings.hf_token, self.settings.hf_endpoint)
        f.ours = self.own_cache is not None
        return f.size

    @staticmethod
    def drop(f: PlanFile) -> None:
        """Delete a file fetched into our own cache (the blob and the snapshot's link to it)."""
        if f.ours and f.local is not None:
            f.local.resolve().unlink(missing_ok=True)
            f.local.unlink(missing_ok=True)


class Stopped(Exception):
    """The run is stopping (another file failed, or Ctrl-C): a long hash gives up."""


def check(plan: Plan, f: PlanFile, styles: set[str], poll=lambda: None) -> str | None:
    """Hash `f` for what its upload must be proven against. Returns why it may not go up, or None.
    `poll()` runs between chunks and may raise to stop a long hash."""
    base = hash_cache.progress(f.path, f.size)

    def progress(n: int) -> None:
        poll()
        base(n)

    if not plan.is_hub:
        if f.hashes and f.hashes.etags() and hash_cache.identity(f.local) == f.stat:
            return None
        h = hash_file(f.local, plan.part_size, progress, sha256=False, git=False, etag_styles=styles)
        if hash_cache.identity(f.local) != f.stat:  # the MD5 read and resolve's sha256 read must see the same bytes
            return "changed since resolve hashed it"
        f.hashes = FileHashes(f.size, f.sha256, "", h.md5, h.multipart_etag)
        return None
    h = hash_file(f.local, plan.part_size, progress, git=not f.sha256, etag_styles=styles)
    if f.sha256 and h.sha256 != f.sha256:
        problem = f"sha256 {h.sha256[:12]}... != Hub {f.sha256[:12]}..."
    elif not f.sha256 and f.git_sha1 and h.git_sha1 != f.git_sha1:
        problem = f"git sha1 {h.git_sha1[:12]}... != Hub {f.git_sha1[:12]}..."
    else:
        f.hashes, f.sha256 = h, h.sha256
        return None
    if f.ours:
        Fetch.drop(f)
        return problem
    return f"{problem}; the copy in the Hugging Face cache at {f.local} is damaged: delete it and stage again"


def bad_files(bad: dict[str, str]) -> IntegrityError:
    exc = IntegrityError(f"{len(bad)} file(s) do not match the source's hashes, not uploaded, nothing published: "
                         + "; ".join(f"{path} ({why})" for path, why in sorted(bad.items())), sorted(bad))
    exc.step = "local_verify"
    return exc


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


class Meter:
    """Bytes, rate and time left of one upload, from samples of the bytes moved so far: the rate over
    the last `window_s` seconds, so a stall shows as a falling rate rather than the run's average."""

    def __init__(self, total: int, window_s: float = 20.0):
        self.total, self.window_s = total, window_s
        self.samples: list[tuple[float, int]] = []

    def add(self, now: float, moved: int) -> None:
        self.samples.append((now, min(moved, self.total)))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.pop(0)

    @property
    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def line(self, confirmed: int, files_done: int, files: int) -> str:
        moved = self.samples[-1][1] if self.samples else 0
        left = (self.total - moved) / self.rate if self.rate > 0 else None
        eta = "time left unknown" if left is None else f"about {_duration(left)} left"
        return (f"upload {moved / 1e9:.2f}/{self.total / 1e9:.2f} GB read by s5cmd ({100 * moved / max(self.total, 1):.0f}%), "
                f"{self.rate / 1e6:.1f} MB/s, {eta}; {files_done}/{files} files ({confirmed / 1e9:.2f} GB) confirmed")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def progress_every() -> float:
    """MODELFERRY_PROGRESS_S: seconds between progress lines of a running upload."""
    return max(0.2, read("MODELFERRY_PROGRESS_S"))


class _Run:
    """One pass of the pipeline over `todo`: a few fetch-and-hash workers feed one s5cmd process;
    each finished upload is proven on a small pool while the rest go on."""

    def __init__(self, bucket: Bucket, plan: Plan, todo: list[PlanFile], fetch: Fetch | None, progress):
        self.bucket, self.plan, self.todo, self.fetch, self.progress = bucket, plan, todo, fetch, progress
        self.by_key = {plan.prefix + f.path: f for f in todo}
        self.total = sum(f.size for f in todo)
        self.spans = {name: _Span() for name in STEP_NAMES}
        self.counts = {"downloaded": 0, "down_bytes": 0, "uploaded": 0, "up_bytes": 0, "sent": 0}
        self.count_lock, self.submit_lock = threading.Lock(), threading.Lock()
        self.failures: list[BaseException] = []
        self.bad: dict[str, str] = {}  # path -> why it may not go up
        self.stop = threading.Event()
        self.done = threading.Event()  # the uploader has finished, one way or another
        self.pct = 0.0
        self.proofs: list = []
        self.styles = layout.etag_styles(bucket)

    def go(self, settings: Settings) -> None:
        # Two at a time: on a shared link, N parallel downloads finish their first file N times later,
        # and the upload waits for that first file. Raise it where each connection is slow on its own.
        workers = read("MODELFERRY_DOWNLOAD_WORKERS") if self.plan.is_hub else 2
        prover = ThreadPoolExecutor(4, thread_name_prefix="prove")
        try:
            with s5cmd.Uploader(settings, self.plan.part_size, on_done=lambda item: self._uploaded(item, prover)) as up:
                threading.Thread(target=self._report, args=(up,), name="progress", daemon=True).start()
                with ThreadPoolExecutor(workers, thread_name_prefix="ferry") as pool:
                    try:
                        list(pool.map(lambda f: self._one_file(f, up), self.todo))
                    except BaseException:  # Ctrl-C: the workers stop at their next chunk, not their next file
                        self.stop.set()
                        raise
                # Files handed over before a failure still go up and get proven: a re-run won't send them.
                with self.spans["upload"]:
                    self.counts["sent"] = up.close()
            for fut in self.proofs:
                fut.result()
        except BaseException as exc:  # an error met first in a worker is the one to report
            self.stop.set()  # Ctrl-C in the main thread: workers take no new file
            if not self.failures:
                self.failures.append(in_step(exc, "upload"))
            if not isinstance(exc, Exception):
                raise
        finally:
            self.done.set()
            prover.shutdown(wait=True, cancel_futures=True)
        if self.failures:
            raise self.failures[0]
        if self.bad:
            raise bad_files(self.bad)

    def _report(self, up: s5cmd.Uploader) -> None:
        """A line every few seconds while bytes are moving: what s5cmd has read of the files handed
        to it (the kernel's count; a 5 GB shard is otherwise silent until it is done)."""
        meter, last = Meter(self.total), None
        meter.add(time.monotonic(), 0)
        while not self.done.wait(progress_every()):
            moved = up.read_bytes()
            meter.add(time.monotonic(), moved)
            if moved == last or not up.in_flight():
                continue
            last = moved
            line = meter.line(self.counts["up_bytes"], self.counts["uploaded"], len(self.todo))
            log.info("%s", line)
            self._progress(100.0 * min(moved, self.total) / max(self.total, 1), line)

    def _progress(self, pct: float, line: str | None = None) -> None:
        """The percentage only ever grows: bytes read run ahead of files confirmed."""
        with self.count_lock:
            pct, self.pct = max(pct, self.pct), max(pct, self.pct)
        if self.progress:
            self.progress(pct, line)

    def _one_file(self, f: PlanFile, uploader: s5cmd.Uploader) -> None:
        if self.stop.is_set():
            return
        step = "download"
        try:
            if self.fetch:
                with self.spans["download"]:
                    got = self.fetch.get(f)
                self._count("downloaded", "down_bytes", got, f.path, "download")
            step = "local_verify"
            with self.spans["local_verify"]:
                problem = check(self.plan, f, self.styles, self._stopped)
            if problem:
                self.bad[f.path] = problem
                return
            step = "upload"
            if self.stop.is_set():
                return
            with self.submit_lock, self.spans["upload"]:
                uploader.submit(s5cmd.Upload(f.local, self.plan.prefix + f.path, f.size, object_metadata(f.hashes)))
        except IntegrityError as exc:
            self.bad[f.path] = str(exc)
        except Stopped:
            return
        except BaseException as exc:
            self.failures.append(in_step(exc, step))
            self.stop.set()

    def _stopped(self) -> None:
        if self.stop.is_set():
            raise Stopped("stopped")

    def _count(self, files: str, nbytes: str, size: int, path: str, what: str) -> tuple[int, int]:
        with self.count_lock:
            self.counts[files] += 1
            self.counts[nbytes] += size
            n, done = self.counts[files], self.counts[nbytes]
        log.info("%s %d/%d files, %.1f/%.1f MB: %s", what, n, len(self.todo), done / 1e6, self.total / 1e6, path)
        return n, done

    def _uploaded(self, item: s5cmd.Upload, prover: ThreadPoolExecutor) -> None:
        _, sent = self._count("uploaded", "up_bytes", item.size, self.by_key[item.key].path, "upload")
        self._progress(100.0 * sent / self.total if self.total else 100.0)
        self.proofs.append(prover.submit(self._prove, self.by_key[item.key]))

    def _prove(self, f: PlanFile) -> None:
        with self.spans["upload"]:
            obj = self.bucket.head(self.plan.prefix + f.path)
            if holds(obj, f):
                f.proven, f.etag = True, obj.etag
                Fetch.drop(f)
                if len(self.styles) > 1 and (style := layout.learn_etag_style(self.bucket, f.hashes, obj.etag)):
                    self.styles.intersection_update({style})

    def fill(self, rows: dict[str, StepStats]) -> None:
        for name in STEP_NAMES:
            rows[name].seconds = self.spans[name].seconds
        rows["download"].files, rows["download"].bytes = self.counts["downloaded"], self.counts["down_bytes"]
        rows["local_verify"].files = len(self.todo) - len(self.bad)
        rows["local_verify"].note = "hashes match the source" if self.plan.is_hub else "unchanged since hashed"
        rows["upload"].files = self.counts["uploaded"]
        rows["upload"].bytes = self.counts["sent"]
