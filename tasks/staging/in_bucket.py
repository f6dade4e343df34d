"""What a stage does inside the bucket before any byte is sent: remove objects under the revision's
prefix that the plan doesn't name (vLLM loads every safetensors file there, so a stray one changes
the model served), and copy files unchanged since the current revision server-side."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from modelferry.tasks.clients.bucket import Bucket
from modelferry.tasks.records.integrity import FileHashes
from modelferry.tasks.staging.plan import Plan, PlanFile, holds

log = logging.getLogger("modelferry.stage")


def prepare(bucket: Bucket, plan: Plan) -> int:
    """Remove the strays `survey` found, then make the planned copies. Returns the copies made."""
    if plan.unexpected:
        bucket.delete([plan.prefix + p for p in plan.unexpected])
        for path in plan.unexpected:
            log.warning("removed %s%s: not in the manifest", plan.prefix, path)
        plan.unexpected = []
    copies = [f for f in plan.pending() if f.copy_from]
    if not copies:
        return 0
    with ThreadPoolExecutor(8) as pool:
        copied = sum(pool.map(lambda f: _copy_and_prove(bucket, plan, f), copies))
    log.info("copied %d unchanged file(s) inside the bucket", copied)
    return copied


def _copy_and_prove(bucket: Bucket, plan: Plan, f: PlanFile) -> bool:
    bucket.copy(f.copy_from, plan.prefix + f.path, f.size, plan.part_size)
    obj = bucket.head(plan.prefix + f.path)
    if holds(obj, f):
        f.proven, f.etag = True, obj.etag
        return True
    # The server formed the copy's ETag in a way the recorded hashes don't predict: send the file.
    log.warning("the copy of %s shows ETag %s, which its recorded hashes don't predict: sending it instead",
                f.path, obj.etag if obj else None)
    f.copy_from, f.hashes = None, (FileHashes(f.size, f.sha256, "", "", None) if f.stat else None)
    return False
