"""What the tests know about processes, read from /proc: which ones a test started and whether they
still run. A process is known by its pid and its start time, so a pid the kernel gave to someone
else since is not mistaken for ours, and a zombie (dead, not yet reaped) does not count as running."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Proc:
    pid: int
    start: int  # clock ticks after boot (/proc/PID/stat field 22): a reused pid has another
    pgid: int = field(compare=False)
    cmdline: str = field(compare=False)

    def __repr__(self):
        return f"<{self.pid} {self.cmdline[:120]}>"


def proc(pid: int) -> Proc | None:
    """`pid` as it is now; None when it is gone or a zombie."""
    try:
        # The command name (field 2) is in parentheses and may hold spaces or ')': split after the last.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return None
    if fields[0] in "ZXx":
        return None
    return Proc(pid, int(fields[19]), int(fields[2]), cmd.replace(b"\0", b" ").decode(errors="replace").strip())


def alive(p: Proc) -> bool:
    """Still running, and still the same process."""
    return proc(p.pid) == p


def living(ps) -> list[Proc]:
    return [p for p in ps if alive(p)]


def _all() -> list[Proc]:
    return [p for d in Path("/proc").glob("[0-9]*") if (p := proc(int(d.name)))]


def tree(pid: int) -> list[Proc]:
    """The running processes `pid` started and theirs (those in sessions of their own included)."""
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            for kid in kids:
                if p := proc(kid):
                    found.append(p)
                    todo.append(kid)
    return found


def group(pgid: int) -> list[Proc]:
    """The running processes of process group `pgid`."""
    return [p for p in _all() if p.pgid == pgid]


def under(root: Path) -> list[Proc]:
    """Running processes whose working directory lies under `root`: a test's own local nodes (each
    runs in its node's dir, under the test's MODELFERRY_CACHE), and nobody else's."""
    found = []
    for p in _all():
        try:
            cwd = os.readlink(f"/proc/{p.pid}/cwd")
        except OSError:
            continue
        if Path(cwd).is_relative_to(root):
            found.append(p)
    return found


def node_pids(logs: list[Path]) -> set[int]:
    """The vLLM processes a run's job logs name (API server, engine core, workers): the processes
    that test started, and the only ones a leftover check may look at."""
    pattern = r"\((?:APIServer|EngineCore\w*|VllmWorker\S*|Worker\S*) pid=(\d+)\)"
    return {int(pid) for log in logs for pid in re.findall(pattern, log.read_text(errors="replace"))}


def running_vllm(pids: set[int]) -> list[Proc]:
    """Those of `pids` running vLLM now. Their start times are not in the logs, so a pid reused by
    another program is told apart by its command line (vLLM names its processes VLLM::...)."""
    return [p for pid in pids if (p := proc(pid)) and "vllm" in p.cmdline.lower()]
