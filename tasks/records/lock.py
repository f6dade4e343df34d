"""The stage lock: one writer per revision, across processes and machines, held in the bucket."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager

from modelferry.tasks.clients.bucket import Bucket
from modelferry.tasks.errors import Locked
from modelferry.tasks.records.layout import lock_key
from modelferry.tasks.settings import read


class Lock:
    """Who may write a revision: one stage at a time, across Prefect runs and plain CLI processes on
    any machine, by conditional writes in the bucket. Created with If-None-Match; a lock older than
    `ttl` (its holder was killed) is taken over, and kept fresh by its heartbeat, with If-Match on the
    ETag last seen, so of two waiters only one takes a stale lock and nobody overwrites a live one.
    On a server without conditional writes (rclone serve s3) the read-back still catches most races.

        with Lock(bucket, name, revision).held(wait=1800):
            ...  # write the revision"""

    def __init__(self, bucket: Bucket, name: str, revision: str, ttl: float = 3600):
        self.bucket, self.key, self.ttl = bucket, lock_key(name, revision), ttl
        self.owner = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self.etag: str | None = None
        self.lost = threading.Event()  # set when the heartbeat finds another holder
        self._beat: threading.Event | None = None

    def _body(self) -> bytes:
        return json.dumps({**self.owner, "since": time.time()}).encode()

    def acquire(self, wait: float = 1800, poll: float = 1.0, log=None) -> None:
        deadline = time.monotonic() + wait
        announced = False
        while True:
            etag = self.bucket.put_if_absent(self.key, self._body())
            if etag and self._still_mine():
                return self._start()
            read = self._read()
            held = read[0] if read else None
            if read and self._stale(held):
                # its holder died (killed, or past the ttl): replace exactly the lock we read
                if self.bucket.put_if_match(self.key, self._body(), read[1]) and self._still_mine():
                    return self._start()
                continue
            if time.monotonic() > deadline:
                raise Locked(f"{self.key} is held by {held.get('host')} pid {held.get('pid')} since "
                             f"{time.strftime('%H:%M:%S', time.gmtime(held.get('since', 0)))} UTC: another stage of this "
                             "revision is running; retry when it ends" if held else f"{self.key} stayed busy")
            if log and not announced:
                log.info("another stage of this revision holds %s; waiting", self.key)
                announced = True
            time.sleep(poll)

    def _read(self) -> tuple[dict | None, str] | None:
        """(holder, ETag) of the lock as stored now; holder None when unreadable. None: no lock."""
        read = self.bucket.get_bytes_and_etag(self.key)
        if read is None:
            return None
        try:
            holder = json.loads(read[0])
        except ValueError:
            holder = None
        return (holder if isinstance(holder, dict) else None), read[1]

    def _still_mine(self) -> bool:
        read = self._read()
        if read and read[0] and read[0].get("id") == self.owner["id"]:
            self.etag = read[1]
            return True
        return False

    def _start(self) -> None:
        self._beat = threading.Event()
        self._beater = threading.Thread(target=self._heartbeat, name="lock-heartbeat", daemon=True)
        self._beater.start()

    def _heartbeat(self) -> None:
        """Keep `since` fresh while we hold the lock, so a long stage is never taken for a dead one."""
        while not self._beat.wait(max(self.ttl / 4, 1.0)):
            etag = self.bucket.put_if_match(self.key, self._body(), self.etag)
            if etag is None:
                self.lost.set()
                return
            self.etag = etag

    def _stale(self, held: dict | None) -> bool:
        if held is None:
            return True  # unreadable: no holder can be alive behind it
        if time.time() - held.get("since", 0) > self.ttl:
            return True
        if held.get("host") == self.owner["host"] and held.get("pid"):
            try:
                os.kill(held["pid"], 0)
            except ProcessLookupError:
                return True  # same machine, process gone: a killed run, resume now
            except PermissionError:
                pass
        return False

    def release(self) -> None:
        if self._beat is not None:
            self._beat.set()
            self._beater.join()  # a heartbeat caught mid-write must not put the lock back after we delete it
            self._beat = None
        if self._still_mine():
            self.bucket.delete([self.key])

    def check(self) -> None:
        """Raise Locked when the heartbeat found another holder: whoever writes next must not publish."""
        if self.lost.is_set():
            raise Locked(f"{self.key} was taken over by another stage while this one ran: nothing published; "
                         "check that stage, then stage again")

    @contextmanager
    def held(self, wait: float | None = None, log=None):
        """Hold the lock for the block. `wait` defaults to MODELFERRY_LOCK_WAIT_S (1800 s)."""
        self.acquire(wait=read("MODELFERRY_LOCK_WAIT_S") if wait is None else wait, log=log)
        try:
            yield self
        finally:
            self.release()
