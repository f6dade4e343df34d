"""What staging one model works on: the plan (a revision's files, their expected hashes, what the
bucket already holds) and one row of the per-step table. Pure data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from modelferry.tasks.clients.bucket import ObjectInfo
from modelferry.tasks.records.layout import model_prefix
from modelferry.tasks.records.integrity import FileHashes, Manifest


def cache_root() -> Path:
    """modelferry's own cache: hashes taken from verified bytes, and Hub files a Dask worker fetched
    only for staging. Hub downloads on the flow's machine go to the user's Hugging Face cache."""
    from modelferry.tasks.settings import read

    return Path(read("MODELFERRY_CACHE")).expanduser()


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
    ours: bool = False  # fetched into modelferry's own cache (deleted once proven), not the user's HF cache


@dataclass
class Plan:
    name: str
    revision: str
    source: dict
    files: list[PlanFile]
    part_size: int
    cache_dir: Path  # where this revision's hash cache lives
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    license: str | None = None
    gated: bool | str = False
    published: Manifest | None = None
    unexpected: list[str] = field(default_factory=list)  # objects under the prefix not in this plan

    @property
    def prefix(self) -> str:
        return model_prefix(self.name, self.revision)

    @property
    def is_hub(self) -> bool:
        return self.source["kind"] == "hub"

    def pending(self) -> list[PlanFile]:
        return [f for f in self.files if not f.proven]

    def to_fetch(self) -> list[PlanFile]:
        """Pending files whose bytes must come from the source (not copied inside the bucket)."""
        return [f for f in self.pending() if not f.copy_from]


def holds(obj: ObjectInfo | None, f: PlanFile) -> bool:
    """Whether the bucket's object is proven to hold `f`: its size, and the ETag the bucket computed
    matching one our hashes predict."""
    return bool(obj and f.hashes and obj.size == f.size and obj.etag in f.hashes.etags())


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
