"""Step `resolve`: the exact revision to stage and its files with the hashes they must have: the
Hub's own (sha256 for LFS files, git blob ids for the rest), or ours for a local checkpoint, taken
now from the bytes. Touches the source only: what the bucket holds is `survey`'s question, asked
under the revision's lock."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from modelferry.tasks.clients import hub
from modelferry.tasks.staging import hash_cache, request
from modelferry.tasks.errors import SourceError
from modelferry.tasks.records.integrity import check_key_length, hash_file, local_revision, part_size_for
from modelferry.tasks.staging.plan import Plan, PlanFile, StepStats, cache_root
from modelferry.tasks.settings import Settings

log = logging.getLogger("modelferry.stage")


def resolve(settings: Settings, source: str, revision: str | None, include: list[str], exclude: list[str],
            name: str | None, allow_unloadable: bool = False) -> tuple[Plan, StepStats]:
    src = request.where_from(source, name)
    if src.kind == "local":
        plan = _local(Path(src.where), src.name, include, exclude)
    else:
        plan = _hub(settings, src.where, revision, include, exclude, src.name)
    request.check_loadable([f.path for f in plan.files], allow_unloadable)
    for f in plan.files:  # a Hub repo's file names are known only now: still before any write
        request.transferable(f.path)
        check_key_length(plan.prefix + f.path)
    if plan.gated:
        log.warning("%s is gated on the Hub (%s): its copy in bucket %s is readable by anyone holding the bucket's keys",
                    plan.name, plan.gated, settings.bucket)
    return plan, StepStats("resolve", files=len(plan.files), note=f"@{plan.revision[:12]}")


def _hub(settings, repo_id, revision, include, exclude, name) -> Plan:
    resolved = hub.resolve(repo_id, revision, include, exclude, settings.hf_token, settings.hf_endpoint)
    files = [PlanFile(f.path, f.size, f.sha256, None if f.lfs else f.git_sha1) for f in resolved.files]
    return Plan(name, resolved.commit, {"kind": "hub", "repo_id": repo_id, "requested": revision or "main"},
                files, part_size_for(max(f.size for f in files)), cache_root() / "hub" / repo_id / resolved.commit,
                include, exclude, resolved.license, resolved.gated)


def _local(root: Path, name: str, include, exclude) -> Plan:
    found = request.walk_local(root, include, exclude)
    sizes = {rel: p.stat().st_size for rel, p in found}
    part_size = part_size_for(max(sizes.values()))
    cache_dir = cache_root() / "local" / name / "_"
    known = hash_cache.load(hash_cache.path_for(cache_dir))
    files = [PlanFile(rel, sizes[rel], local=p) for rel, p in found]

    def hashed(f: PlanFile) -> PlanFile:
        f.stat = hash_cache.identity(f.local)
        entry = known.get(str(f.local))
        if entry and entry.get("stat") == f.stat:
            f.hashes = hash_cache.cached(entry, f, part_size)
        if f.hashes is None:  # sha256 only: the ETag's MD5 is taken later, while earlier files upload
            f.hashes = hash_file(f.local, part_size, hash_cache.progress(f.path, f.size), git=False, etag_styles=set())
            if hash_cache.identity(f.local) != f.stat:
                raise SourceError(f"{f.path} changed while it was being hashed: stage it once it is written")
        f.sha256 = f.hashes.sha256
        return f

    with ThreadPoolExecutor(2, thread_name_prefix="hash") as pool:  # hashlib releases the GIL: two cores
        list(pool.map(hashed, sorted(files, key=lambda f: -f.size)))
    revision = local_revision([(f.path, f.size, f.sha256) for f in files])
    plan = Plan(name, revision, {"kind": "local", "path": str(root)}, files, part_size, cache_dir, include, exclude)
    hash_cache.save(plan)
    return plan
