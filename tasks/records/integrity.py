"""The integrity chain, pure: hashing, ETag prediction, and the manifest.

Chain: the Hub's sha256 (LFS files) or git blob sha1 (other files) -> the local file's hashes, taken
in one read -> the object's ETag, which the bucket computes itself from the bytes it stored. We
predict that ETag from part MD5s taken in the same read, so a matching ETag proves the stored bytes
are the verified local bytes without downloading them again. No network library is imported here.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from modelferry.tasks.errors import IntegrityError, SourceError

SCHEMA_VERSION = 1
MiB = 1024 * 1024
DEFAULT_PART_MIB = 50  # s5cmd's own default; we pass it explicitly so the ETag stays predictable
MAX_PARTS = 10_000  # S3 multipart limit
MAX_OBJECT = 5 * 1024**4  # 5 TiB
CHUNK = 8 * MiB


def part_size_for(largest_file: int, minimum_mib: int = DEFAULT_PART_MIB) -> int:
    """Smallest part size (whole MiB, at least `minimum_mib`) that fits the largest file in 10,000 parts."""
    if largest_file > MAX_OBJECT:
        raise SourceError(f"a file of {largest_file} bytes exceeds S3's 5 TiB object limit")
    need = largest_file // MAX_PARTS + 1  # the SDK grows the part size once size/part reaches 10,000
    return max(minimum_mib, -(-need // MiB)) * MiB


@dataclass
class FileHashes:
    size: int
    sha256: str
    git_sha1: str
    md5: str
    multipart_etag: str | None  # None when the file goes up in one PUT

    def etags(self) -> set[str]:
        """The ETags these hashes predict (empty when no MD5 was taken)."""
        return etag_forms(self.md5, self.multipart_etag)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def multipart_etag(part_md5s: list[bytes]) -> str:
    return f"{hashlib.md5(b''.join(part_md5s)).hexdigest()}-{len(part_md5s)}"


class _PartMD5:
    """MD5 of each `part_size` slice of a stream."""

    def __init__(self, part_size: int):
        self.part_size, self.part, self.in_part, self.parts = part_size, hashlib.md5(), 0, []

    def update(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            take = min(len(view), self.part_size - self.in_part)
            self.part.update(view[:take])
            self.in_part += take
            view = view[take:]
            if self.in_part == self.part_size:
                self.parts.append(self.part.digest())
                self.part, self.in_part = hashlib.md5(), 0

    def finish(self) -> list[bytes]:
        if self.in_part:
            self.parts.append(self.part.digest())
        return self.parts


_pool = ThreadPoolExecutor(2, thread_name_prefix="hash")

WHOLE, PARTS = "whole-md5", "md5-of-parts"  # how a bucket forms a multipart object's ETag


def hash_file(path: Path, part_size: int, progress=None, *, sha256: bool = True, git: bool = True,
              etag_styles: frozenset[str] | set[str] = frozenset({WHOLE, PARTS})) -> FileHashes:
    """Read `path` once and return the hashes asked for: sha256, the git blob sha1 (only files kept
    in git, not LFS, are checked against it), and the MD5s behind the ETag styles in `etag_styles`
    (`WHOLE`: rclone's whole-file MD5; `PARTS`: S3's and R2's part MD5s at `part_size`). Hashes not
    asked for come back empty. The whole-file MD5 runs on a second thread (hashlib releases the GIL),
    so two cores share the work. `progress(n)` runs per chunk."""
    size = path.stat().st_size
    single = size <= part_size  # one PUT: its ETag is the whole MD5 on every server
    want_whole = single or WHOLE in etag_styles
    sha = hashlib.sha256() if sha256 else None
    md5 = hashlib.md5() if want_whole and etag_styles else None
    git_sha1 = hashlib.sha1(b"blob %d\0" % size) if git else None
    parts = _PartMD5(part_size) if not single and PARTS in etag_styles else None
    inline = [h.update for h in (sha, git_sha1, parts) if h is not None]

    def main_thread(chunk):
        for update in inline:
            update(chunk)

    read = 0
    buf = bytearray(CHUNK)  # one buffer for the whole file: a fresh 8 MiB object per read costs page faults
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            chunk = memoryview(buf)[:n]
            read += n
            if md5 is None:
                main_thread(chunk)
            elif len(chunk) < MiB or not inline:
                md5.update(chunk)
                main_thread(chunk)
            else:
                other = _pool.submit(md5.update, chunk)
                main_thread(chunk)
                other.result()
            if progress:
                progress(len(chunk))
    if read != size:
        raise IntegrityError(f"{path} changed size while being hashed ({size} -> {read} bytes)", [str(path)])
    return FileHashes(size, sha.hexdigest() if sha else "", git_sha1.hexdigest() if git_sha1 else "",
                      md5.hexdigest() if md5 else "", multipart_etag(parts.finish()) if parts else None)


def etag_forms(md5: str, multipart: str | None) -> set[str]:
    """ETags a correct upload may show. S3, R2 and moto: the MD5 for a single PUT, `md5(part md5s)-N`
    for multipart. rclone serve s3 stores a whole-file MD5 even for multipart uploads."""
    return ({md5} if md5 else set()) | ({multipart} if multipart else set())


MAX_KEY_BYTES = 1024  # S3 and R2 object key limit


def check_key_length(key: str) -> str:
    if len(key.encode()) > MAX_KEY_BYTES:
        raise SourceError(f"object key for {key.rsplit('/', 1)[-1]!r} would be {len(key.encode())} bytes: S3 and R2 "
                          f"allow {MAX_KEY_BYTES}; shorten the file path or the model name")
    return key


def check_relpath(path: str) -> str:
    """A file path from a source or a manifest must stay inside its prefix."""
    norm = posixpath.normpath(path)
    if (
        not path
        or path.startswith("/")
        or "\\" in path
        or norm != path
        or norm == "."
        or norm.startswith("../")
        or norm == ".."
        or any(ord(c) < 32 for c in path)
    ):
        raise SourceError(f"unsafe file path {path!r}: paths must be relative, without '..' or '\\'")
    return path


@dataclass
class FileEntry:
    path: str
    size: int
    sha256: str
    md5: str = ""
    multipart_etag: str | None = None
    etag: str = ""  # as the bucket reported it at remote verification
    git_sha1: str | None = None
    lfs: bool = False

    def accepted_etags(self) -> set[str]:
        return etag_forms(self.md5, self.multipart_etag)


@dataclass
class Manifest:
    name: str
    revision: str
    source: dict
    files: list[FileEntry]
    part_size: int
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    license: str | None = None
    gated: bool | str = False
    staged_at: str = ""
    proof: str = "etag"
    schema_version: int = SCHEMA_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        raw = json.loads(text)
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise IntegrityError(f"manifest schema_version {raw.get('schema_version')!r} is not {SCHEMA_VERSION}")
        files = [FileEntry(**f) for f in raw.pop("files")]
        for f in files:
            check_relpath(f.path)
        return cls(files=files, **raw)


def local_revision(files: list[tuple[str, int, str]]) -> str:
    """Revision id of a local checkpoint: stable for the same paths, sizes and contents."""
    listing = "".join(f"{p}\t{s}\t{h}\n" for p, s, h in sorted(files))
    return "local-" + hashlib.sha256(listing.encode()).hexdigest()[:16]
