"""The node program (tasks/on_node/node.py): its sizing rules called directly, against fake /proc/meminfo
and cgroup files, and what it hands vLLM. How it runs as the task's job (its output to EOF, stops,
exit status) is in test_sky_task.py; with real vLLM in the real_vllm tier."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from modelferry.tasks.launch import local_target, options, skytask
from modelferry.tasks.on_node import node
from modelferry.tasks.on_node.node import GIB, NodeError

GB = 10**9


def meminfo(folder: Path, available_bytes: int) -> Path:
    path = folder / "meminfo"
    path.write_text(f"MemTotal:       {available_bytes // 1024 + 1048576} kB\nMemFree:        1024 kB\n"
                    f"MemAvailable:   {available_bytes // 1024} kB\nBuffers:        0 kB\n")
    return path


def cgroup_v2(folder: Path, limit: str, current: int, inactive_file: int, cpu_max: str | None = None) -> Path:
    root = folder / "cgroup"
    root.mkdir()
    (root / "memory.max").write_text(limit + "\n")
    (root / "memory.current").write_text(f"{current}\n")
    (root / "memory.stat").write_text(f"anon {current - inactive_file}\nfile {inactive_file}\n"
                                      f"active_file 0\ninactive_file {inactive_file}\n")
    if cpu_max:
        (root / "cpu.max").write_text(cpu_max + "\n")
    return root


def cgroup_v1(folder: Path, limit: int, usage: int, inactive_file: int) -> Path:
    root = folder / "cgroup"
    (root / "memory").mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (root / "memory" / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (root / "memory" / "memory.stat").write_text(f"cache {inactive_file}\ntotal_inactive_file {inactive_file}\n")
    return root


def on_node(tmp_path, gpus: int, available: int, cgroup: Path | None = None, cpus: int = 16, **env):
    """The node program's loader settings and line on a fake node, for the task's own envs."""
    cfg = skytask.build_task_config(model_uri="s3://b/models/acme/m/abc/", served_name="acme/m", model_bytes=16 * GB,
                                    weights="r2", options=options.LaunchOptions(compile_cache=False), loader_env={})
    node_env = {**{k: str(v) for k, v in cfg["envs"].items()}, "SKYPILOT_NUM_GPUS_PER_NODE": str(gpus), **env}
    return node.loader_config(node_env, meminfo(tmp_path, available), cgroup or tmp_path / "no-cgroup", cpus)


@pytest.mark.parametrize("gpus,available,limit,distributed", [
    (1, 64 * GIB, 29 * GIB, False),  # (64 - 2 processes x 3) / 2
    (4, 64 * GIB, 49 * GIB // 2, True),  # (64 - 5 x 3) / 2: the ranks share one node total
    (4, 512 * GIB, 32 * GIB, True),  # capped
    (8, 1024 * GIB, 32 * GIB, True),
    (1, 14 * GIB, 4 * GIB, False),  # a 16 GiB host, as MemAvailable sees it after boot
    (1, 8 * GIB, 0, False),  # under the 2 GiB floor: one buffer of the largest tensor
    (8, 20 * GIB, 0, True),  # less than the processes need: still the least that streams, never -1
])
def test_the_buffer_is_sized_from_the_node(tmp_path, gpus, available, limit, distributed):
    config, line = on_node(tmp_path, gpus, available)
    assert config == {"concurrency": 16, "memory_limit": limit, "distributed": distributed}
    assert line == (f"modelferry loader concurrency=16 memory_limit={limit} distributed={str(distributed).lower()} "
                    f"(readers one per CPU of 16; host {available} bytes available, cgroup none; sized from the node)")


@pytest.mark.parametrize("make_cgroup,counted", [
    (lambda d: cgroup_v2(d, str(16 * GIB), 6 * GIB, 2 * GIB), 12 * GIB),  # limit - (current - inactive page cache)
    (lambda d: cgroup_v1(d, 16 * GIB, 6 * GIB, 2 * GIB), 12 * GIB),
    (lambda d: cgroup_v2(d, "max", 6 * GIB, 0), None),
    (lambda d: cgroup_v1(d, 9223372036854771712, 6 * GIB, 0), None),  # v1's "unlimited"
    (lambda d: cgroup_v2(d, str(1024 * GIB), GIB, 0), 1023 * GIB),  # a limit above MemAvailable: MemAvailable
])
def test_a_container_memory_limit_bounds_what_counts_as_available(tmp_path, make_cgroup, counted):
    config, line = on_node(tmp_path, 1, 64 * GIB, cgroup=make_cgroup(tmp_path))
    available = min(counted or 64 * GIB, 64 * GIB)
    assert config["memory_limit"] == min((available - 6 * GIB) // 2, 32 * GIB)
    assert f"cgroup {counted if counted is not None else 'none'};" in line, line


def test_memory_limit_and_concurrency_override_the_sizing(tmp_path):
    config, line = on_node(tmp_path, 4, 64 * GIB, LOADER_MEMORY_LIMIT=str(5 * GIB), LOADER_CONCURRENCY="64")
    assert config == {"concurrency": 64, "memory_limit": 5 * GIB, "distributed": True}
    assert "readers set by --concurrency" in line and line.endswith("; set by --memory-limit)"), line


@pytest.mark.parametrize("cpus,readers", [(1, 2), (2, 2), (8, 8), (16, 16), (96, 32)])
def test_the_streamer_gets_one_reader_per_cpu(tmp_path, cpus, readers):
    config, line = on_node(tmp_path, 1, 64 * GIB, cpus=cpus)
    assert config["concurrency"] == readers and line.startswith(f"modelferry loader concurrency={readers} "), line


def test_usable_cpus_are_the_affinity_under_the_containers_quota(tmp_path):
    mine = len(os.sched_getaffinity(0))
    assert node.usable_cpus(tmp_path / "no-cgroup") == mine
    assert node.usable_cpus(cgroup_v2(tmp_path, "max", 0, 0, cpu_max="50000 100000")) == 1  # half a CPU: one
    (tmp_path / "cgroup" / "cpu.max").write_text("max 100000\n")
    assert node.usable_cpus(tmp_path / "cgroup") == mine


def test_readers_come_from_the_cpus_under_skypilots_runtime_environment(tmp_path):
    """SkyPilot runs every task with OMP_NUM_THREADS=1, which GNU nproc prints as the CPU count: the
    node program must not ask nproc. Under the local node's copy of that environment, nproc says 1
    and the readers are still one per CPU this process may use."""
    env = {**os.environ, **local_target.sky_runtime_env(gpus=1, task_id="t", cluster="c")}
    assert env["OMP_NUM_THREADS"] == "1"
    assert subprocess.run(["nproc"], env=env, capture_output=True, text=True).stdout.strip() == "1"
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import node; "
            "print(json.dumps(node.loader_config(dict(__import__('os').environ))[0]))")
    out = subprocess.run(["python3", "-c", code, str(Path(node.__file__).parent)], env={**env, "LOADER_CONCURRENCY": "auto",
                         "LOADER_MEMORY_LIMIT": "auto"}, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["concurrency"] == node.readers(len(os.sched_getaffinity(0)))


@pytest.mark.parametrize("name,value,message", [
    ("LOADER_CONCURRENCY", "many", "LOADER_CONCURRENCY=many: use auto or a number"),
    ("LOADER_MEMORY_LIMIT", "-1", "LOADER_MEMORY_LIMIT=-1: use auto or a number"),  # never unbounded, even hand-edited
    ("LOADER_MEMORY_LIMIT", "", "LOADER_MEMORY_LIMIT=: use auto or a number"),
    ("LOADER_MEMORY_LIMIT", "lots", "use auto or a number"),
])
def test_inputs_the_node_cant_use_are_refused_by_name(tmp_path, name, value, message):
    with pytest.raises(NodeError, match=message):
        on_node(tmp_path, 1, 64 * GIB, **{name: value})


def shards(model_bytes: int) -> tuple[int, ...]:
    """The Hub's usual layout: 5 GB files, the last one what is left."""
    full, rest = divmod(model_bytes, 5 * GB)
    return (5 * GB,) * full + ((rest,) if rest else ())


@pytest.mark.parametrize("model_bytes", [0, 2 * GB, 16 * GB, 70 * GB, 140 * GB, 800 * GB])
@pytest.mark.parametrize("gpus", options.GPU_COUNTS)
def test_a_host_of_exactly_the_asked_size_gets_the_ring_the_ask_assumed(tmp_path, model_bytes, gpus):
    """The ask (skytask.host_memory_ask) and the node's rule agree: on a host with just the memory
    asked for, less what the system holds, the buffer is at least ring_gib, or the weights' ring
    where that is less, and never the fallback."""
    files = shards(model_bytes)
    ask = float(skytask.host_memory_ask(model_bytes, gpus)[:-1])
    config, line = on_node(tmp_path, gpus, int((ask - skytask.SYSTEM_GIB) * GIB),
                           LOADER_WEIGHTS_BYTES=str(sum(files)) if files else "",
                           LOADER_LARGEST_FILE=str(max(files)) if files else "")
    wanted = node.ring_bytes(sum(files), max(files), gpus) if files else node.RING_CAP_GIB * GIB
    assert min(skytask.ring_gib(model_bytes) * GIB, wanted) <= config["memory_limit"] <= wanted, line


@pytest.mark.parametrize("files,gpus,ring", [
    (shards(16 * GB), 1, 5 * GB),  # an 8B model in the Hub's 5 GB shards: its largest file
    (shards(16 * GB), 8, 32 * GIB),  # eight ranks: a file each, at most the cap
    (shards(16 * GB), 2, 10 * GB),  # two ranks, a file each
    (shards(120 * GB), 1, 30 * GB),  # a quarter
    (shards(800 * GB), 1, 32 * GIB),  # at most the cap
    ((333_000_000,) * 3 + (331_000_000,), 1, 333_000_000),  # bench/weights.py's sized model: its largest file
    ((400_000_000,) * 8, 1, 800_000_000),  # small files: a quarter
    ((34 * 10**6,), 1, 34 * 10**6),  # one file: the whole of it (it spans)
])
def test_the_weights_ring_is_a_quarter_of_them_and_holds_their_largest_file_per_gpu(tmp_path, files, gpus, ring):
    assert node.ring_bytes(sum(files), max(files), gpus) == ring
    cfg = skytask.build_task_config(model_uri="s3://b/m/", served_name="m", model_bytes=sum(files), weights="r2",
                                    options=options.LaunchOptions(), loader_env={}, weight_files=files)
    assert (cfg["envs"]["LOADER_WEIGHTS_BYTES"], cfg["envs"]["LOADER_LARGEST_FILE"]) == (str(sum(files)), str(max(files)))
    config, line = on_node(tmp_path, gpus, 1024 * GIB, LOADER_WEIGHTS_BYTES=str(sum(files)),
                           LOADER_LARGEST_FILE=str(max(files)))
    assert config["memory_limit"] == ring, line


@pytest.mark.parametrize("available,limit", [
    (64 * GIB, 5 * GB),  # the node has more: the ring the weights want
    (14 * GIB, 4 * GIB),  # a 16 GiB host: the node's budget
    (8 * GIB, 0),  # under the floor: still the fallback, not a ring the node can't hold
])
def test_the_buffer_stays_under_the_weights_ring(tmp_path, available, limit):
    config, line = on_node(tmp_path, 1, available, LOADER_WEIGHTS_BYTES=str(16 * GB), LOADER_LARGEST_FILE=str(5 * GB))
    assert config["memory_limit"] == limit, line
    assert line.endswith(f"sized from the node and the ring of {5 * GB} bytes the weights want)"), line


@pytest.mark.parametrize("weights,largest", [("16GB", "5000000000"), ("08", "1"), ("16000000000", "-1")])
def test_weights_that_are_no_size_are_refused_unless_the_limit_is_set(tmp_path, weights, largest):
    with pytest.raises(NodeError, match="use numbers of bytes, or leave both empty"):
        on_node(tmp_path, 1, 64 * GIB, LOADER_WEIGHTS_BYTES=weights, LOADER_LARGEST_FILE=largest)
    config, _ = on_node(tmp_path, 1, 64 * GIB, LOADER_MEMORY_LIMIT=str(5 * GIB), LOADER_WEIGHTS_BYTES=weights,
                        LOADER_LARGEST_FILE=largest)  # --memory-limit decides alone: the weights are not read
    assert config["memory_limit"] == 5 * GIB


BASE = {"MODEL_URI": "s3://b/m/", "SERVED_MODEL_NAME": "acme/m", "SKYPILOT_NUM_GPUS_PER_NODE": "2",
        "SERVE_HOST": "0.0.0.0", "SERVE_PORT": "8000", "PREFETCH_DIR": "/tmp/m"}


def test_vllm_is_asked_for_what_the_task_says():
    loader = {"concurrency": 4, "memory_limit": 0, "distributed": True}
    args = node.vllm_command({**BASE, "LOAD_STRATEGY": "stream", "MAX_MODEL_LEN": "8192",
                              "EXTRA_VLLM_ARGS": "--enforce-eager --override-generation-config '{\"temperature\": 0}'"}, loader)
    assert args == ["vllm", "serve", "s3://b/m/", "--load-format", "runai_streamer", "--model-loader-extra-config",
                    json.dumps(loader), "--served-model-name", "acme/m", "--tensor-parallel-size", "2", "--host", "0.0.0.0",
                    "--port", "8000", "--max-model-len", "8192", "--enforce-eager", "--override-generation-config",
                    '{"temperature": 0}']
    prefetch = node.vllm_command({**BASE, "LOAD_STRATEGY": "prefetch"}, None)
    assert prefetch[2] == "/tmp/m" and "--load-format" not in prefetch and "--max-model-len" not in prefetch
    hub = node.vllm_command({**BASE, "LOAD_STRATEGY": "hub", "MODEL_REVISION": "abc"}, None)
    assert hub[3:5] == ["--revision", "abc"]
    with pytest.raises(NodeError, match="MAX_MODEL_LEN=8k"):
        node.vllm_command({**BASE, "MAX_MODEL_LEN": "8k"}, loader)


# vLLM 0.32's failed start as its processes print it: the engine core's cause and traceback
# (v1/engine/core.py), then the API server's wrapper (v1/engine/utils.py).
FAILED_START = """\
(EngineCore pid=51) ERROR 12-06 12:01:02 [core.py:1510] EngineCore failed to start.
(EngineCore pid=51) ERROR 12-06 12:01:02 [core.py:1510] Traceback (most recent call last):
(EngineCore pid=51) ERROR 12-06 12:01:02 [core.py:1510]   File "/vllm/v1/core/kv_cache_utils.py", line 1030, in check
(EngineCore pid=51) ERROR 12-06 12:01:02 [core.py:1510] ValueError: To serve at least one request with the models's max seq len (1048576), (2.00 GiB KV cache is needed, which is larger than the available KV cache memory (1.00 GiB).
Process EngineCore:
Traceback (most recent call last):
ValueError: To serve at least one request with the models's max seq len (1048576), (2.00 GiB KV cache is needed, which is larger than the available KV cache memory (1.00 GiB).
(APIServer pid=50) Traceback (most recent call last):
(APIServer pid=50)   File "/vllm/v1/engine/utils.py", line 1434, in wait_for_engine_startup
(APIServer pid=50) RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}
"""


def test_a_failed_start_is_reported_by_its_cause_not_vllms_wrapper():
    cause = node.root_cause(FAILED_START)
    assert cause.startswith("ValueError: To serve at least one request with the models's max seq len (1048576)"), cause
    assert node.root_cause("RuntimeError: something else entirely\n") == "RuntimeError: something else entirely"
    assert node.root_cause("INFO all well\n") is None


def test_the_streamers_retries_are_on_and_bounded_by_the_wait_for_health():
    assert node.streamer_retry_s(1800) == 600 and node.streamer_retry_s(300) == 100 and node.streamer_retry_s(2) == 1


def test_the_root_cause_passes_every_wrapper_vllm_puts_around_it():
    """With more than one GPU the last exception is a worker's wrapper (multiproc_executor.py 789-792);
    pydantic's detail comes on the next line, under the same process prefix."""
    multi_gpu = FAILED_START.replace("Process EngineCore:", "(Worker_TP0 pid=60) Exception: WorkerProc initialization "
                                     "failed due to an exception in a background process. See stack trace for root cause.")
    assert node.root_cause(multi_gpu).startswith("ValueError: To serve at least one request")
    pydantic = ("(APIServer pid=5) pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
                "(APIServer pid=5)   Value error, Invalid repository ID or local directory specified: 's3://b/m/'\n")
    assert node.root_cause(pydantic).endswith("Value error, Invalid repository ID or local directory specified: 's3://b/m/'")
    # The executor's worker monitor, when a worker's exit beats the shutdown (seen on a loaded machine).
    died = ("(EngineCore pid=51) ERROR 12-06 12:01:03 [multiproc_executor.py:315] Worker proc VllmWorker-0 died "
            "unexpectedly (exit code: 0), shutting down executor.\n")
    assert node.root_cause(FAILED_START + died).startswith("ValueError: To serve at least one request")
    killed = died.replace("exit code: 0", "exit code: -9")
    assert node.root_cause(killed) == " ".join(killed.split())  # alone, it is the cause


def vllm_metrics(running: int, waiting: int, finished: dict[str, int]) -> str:
    """/metrics as vLLM 0.32 writes it: its series, names and labels (v1/metrics/loggers.py 527-546,
    807-820), through the same prometheus_client, which adds `_total` to a counter's samples."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

    registry = CollectorRegistry()
    labels = ["model_name", "engine"]
    Gauge("vllm:num_requests_running", "", labels, registry=registry).labels("acme/m", "0").set(running)
    Gauge("vllm:num_requests_waiting", "", labels, registry=registry).labels("acme/m", "0").set(waiting)
    Gauge("vllm:kv_cache_usage_perc", "", labels, registry=registry).labels("acme/m", "0").set(0.5)
    success = Counter("vllm:request_success", "", [*labels, "finished_reason"], registry=registry)
    for reason, count in finished.items():
        success.labels("acme/m", "0", reason).inc(count)
    Counter("vllm:prompt_tokens", "", labels, registry=registry).labels("acme/m", "0").inc(99)
    return generate_latest(registry).decode()


def test_idle_is_read_from_vllms_request_series():
    text = vllm_metrics(running=1, waiting=2, finished={"stop": 3, "length": 4, "abort": 1})
    assert "vllm:request_success_total{" in text and "vllm:request_success_created{" in text
    assert node.request_counts(text) == (3, 8)
    assert node.request_counts(vllm_metrics(0, 0, {})) == (0, 0)


def test_the_idle_clock_restarts_on_any_request_and_on_a_node_it_cant_read():
    clock = node.IdleClock(now=0)
    assert clock.read(10, (0, 5)) == 10  # nothing in flight: idle since the clock started
    assert clock.read(20, (0, 6)) == 0  # one came and went between two reads
    assert clock.read(30, (1, 6)) == 0  # one in flight
    assert clock.read(40, None) == 0  # /metrics did not answer: not known to be idle
    assert clock.read(100, (0, 6)) == 60


@pytest.mark.parametrize("value,message", [("0", "IDLE_MINUTES=0"), ("ten", "IDLE_MINUTES=ten"), ("-1", "IDLE_MINUTES=-1")])
def test_an_idle_limit_the_node_cant_use_is_refused_by_name(value, message):
    with pytest.raises(NodeError, match=message):
        node.idle_minutes({"IDLE_MINUTES": value})
    assert node.idle_minutes({"IDLE_MINUTES": ""}) is None and node.idle_minutes({"IDLE_MINUTES": "30"}) == 30


def test_vllm_is_stopped_once_it_serves_no_request_for_the_idle_limit():
    """`watch_idle` against an HTTP server answering /health and /metrics as vLLM does: while the
    finished count moves, the clock restarts; once it stops moving, vLLM is stopped after the limit."""
    import http.server
    import threading
    import time

    served = {"finished": {"stop": 0}}

    class Vllm(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = vllm_metrics(0, 0, served["finished"]).encode() if self.path == "/metrics" else b""
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Vllm)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    vllm = subprocess.Popen(["sleep", "60"])
    stopped = []
    try:
        watcher = threading.Thread(target=node.watch_idle, daemon=True,
                                   args=(vllm, f"http://127.0.0.1:{server.server_port}", 1.0,
                                         lambda: stopped.append(time.monotonic()), 0.1))
        watcher.start()
        busy_until = time.monotonic() + 2.5
        while time.monotonic() < busy_until:  # a request finishes every 0.2 s: never idle for 1 s
            served["finished"]["stop"] += 1
            time.sleep(0.2)
        assert not stopped
        watcher.join(5)
        assert stopped and 0.9 < stopped[0] - busy_until < 2.0
    finally:
        vllm.kill()
        server.shutdown()


def test_the_node_installs_only_what_the_task_pins():
    assert node.pinned({"STREAMER_VERSION": "0.17.0"}, "STREAMER_VERSION") == "0.17.0"
    for value in ("", "latest", "0.17.0; rm -rf /"):
        with pytest.raises(NodeError, match="STREAMER_VERSION="):
            node.pinned({"STREAMER_VERSION": value}, "STREAMER_VERSION")
