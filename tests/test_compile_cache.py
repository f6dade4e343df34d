"""vLLM compile-cache carry-over: key derivation, save/restore through the real bucket with the
node-side tool, integrity refusal, and the generated task's steps."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from modelferry.tasks.on_node import compile_cache as cc
from modelferry.tasks.clients import processes
from tests.helpers import write_files

TOOL = Path(cc.__file__)
BASE = dict(model_uri="s3://b/models/acme/m/abc/", revision="abc", vllm_version="0.11.0", gpu="NVIDIA H100 80GB HBM3",
            tensor_parallel=1, compile_options="")


def test_each_input_changes_the_key_and_equal_inputs_match():
    key = cc.derive_key(**BASE)
    assert key == cc.derive_key(**dict(BASE))
    for field, other in [("model_uri", "s3://b/models/acme/other/abc/"), ("revision", "def"), ("vllm_version", "0.12.0"),
                         ("gpu", "NVIDIA L4"), ("tensor_parallel", 2), ("compile_options", "--enforce-eager"),
                         ("strategy", "prefetch")]:
        assert cc.derive_key(**{**BASE, field: other}) != key, field
    assert cc.derive_key(**{**BASE, "model_uri": BASE["model_uri"].rstrip("/")}) == key  # same prefix


@pytest.fixture
def node_env(bucket, monkeypatch):
    env = {"AWS_ENDPOINT_URL": bucket.endpoint, "AWS_ACCESS_KEY_ID": bucket.access_key,
           "AWS_SECRET_ACCESS_KEY": bucket.secret_key, "AWS_REGION": "auto", "COMPILE_CACHE_BUCKET": bucket.bucket,
           "S5CMD": processes.which("s5cmd")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def make_tree(root: Path) -> dict[str, bytes]:
    files = {f"vllm/{h:02x}/rank_0_0/backbone/artifact_{i}.py": os.urandom(64 + i) for h in range(4) for i in range(50)}
    files["vllm/empty_marker"] = b""
    files["triton/ABCD/kernel.cubin"] = os.urandom(20000)
    return write_files(root, files)


def read_tree(dirs: dict[str, Path]) -> dict[str, bytes]:
    return {f"{n}/{p.relative_to(d).as_posix()}": p.read_bytes() for n, d in dirs.items() if d.exists()
            for p in d.rglob("*") if p.is_file()}


def test_save_then_restore_is_byte_identical_and_tampering_is_refused(node_env, tmp_path, s3):
    src = tmp_path / "node-a"
    files = make_tree(src)
    dirs_a = {"vllm": src / "vllm", "triton": src / "triton"}
    key = cc.derive_key(**{**BASE, "revision": f"roundtrip-{os.getpid()}"})
    assert cc.save(key, dirs_a).startswith("saved 202 files")
    assert cc.save(key, dirs_a) == "already stored"

    dirs_b = {"vllm": tmp_path / "node-b" / "vllm", "triton": tmp_path / "node-b" / "triton"}
    assert cc.restore(key, dirs_b) == "hit"
    assert read_tree(dirs_b) == files

    assert cc.restore("no-such-key", {"vllm": tmp_path / "c"}) == "miss"

    victim = f"compile-cache/{key}/files/triton/ABCD/kernel.cubin"
    s3.put_bytes(victim, os.urandom(20000))
    dirs_c = {"vllm": tmp_path / "node-c" / "vllm", "triton": tmp_path / "node-c" / "triton"}
    outcome = cc.restore(key, dirs_c)
    assert outcome.startswith("refused") and "kernel.cubin" in outcome
    assert not dirs_c["vllm"].exists() and not dirs_c["triton"].exists()


def test_the_node_tool_runs_on_the_standard_library_alone_and_never_fails_the_node(node_env, tmp_path):
    env = {**node_env, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MODEL_URI": "s3://b/models/a/b/r/",
           "MF_GPU_NAME": "NVIDIA L4", "SKYPILOT_NUM_GPUS_PER_NODE": "1", "LOAD_STRATEGY": "stream"}
    key = subprocess.run(["/usr/bin/python3", "-I", str(TOOL), "key"], env=env, capture_output=True, text=True)
    assert key.returncode == 0 and len(key.stdout.strip()) == 24
    miss = subprocess.run(["/usr/bin/python3", "-I", str(TOOL), "restore", key.stdout.strip()], env=env,
                          capture_output=True, text=True)
    assert miss.returncode == 0 and "compile cache: miss" in miss.stderr
    broken = subprocess.run(["/usr/bin/python3", "-I", str(TOOL), "restore", "k"],
                            env={**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, capture_output=True, text=True)
    assert broken.returncode == 0  # a failed restore is logged, the server starts anyway


def test_the_key_takes_the_version_the_nodes_vllm_reports(tmp_path):
    """The node's python3 is the vLLM venv's (as in the image): the key reads its vLLM's version
    without importing vLLM (tens of seconds here)."""
    python = os.environ["MODELFERRY_VLLM_PYTHON"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MODEL_URI": "s3://b/models/a/b/r/", "MODEL_REVISION": "r",
           "MF_GPU_NAME": "cpu", "SKYPILOT_NUM_GPUS_PER_NODE": "1", "LOAD_STRATEGY": "stream"}
    key = subprocess.run([python, str(TOOL), "key"], env=env, capture_output=True, text=True, timeout=60)
    assert key.stdout.strip() == cc.derive_key(model_uri="s3://b/models/a/b/r/", revision="r", vllm_version="0.32.0",
                                               gpu="cpu", tensor_parallel=1, strategy="stream"), key.stderr


def test_the_cache_dirs_are_where_the_nodes_vllm_keeps_them(monkeypatch, tmp_path):
    """vLLM 0.32's envs.py: VLLM_CACHE_ROOT, else $XDG_CACHE_HOME/vllm, else ~/.cache/vllm; Triton's
    knobs.py: TRITON_CACHE_DIR, else $TRITON_HOME/.triton/cache, else ~/.triton/cache."""
    for name in ("VLLM_CACHE_ROOT", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "TRITON_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setenv("LOGNAME", "node")

    def derived(root):  # vLLM 0.32: registry.py, v1/worker/startup_plan.py, warmup/flashinfer_autotune_cache.py;
        # torch 2.13: _inductor/codecache.py _HEADER_DIR
        return {"modelinfos": root / "modelinfos", "startup_plan": root / "startup_plan",
                "flashinfer_autotune": root / "flashinfer_autotune_cache",
                "inductor_headers": tmp_path / "tmp" / "torchinductor_node" / "precompiled_headers"}

    assert cc.local_dirs() == {"vllm": tmp_path / "home" / ".cache" / "vllm" / "torch_compile_cache",
                               "triton": tmp_path / "home" / ".triton" / "cache",
                               **derived(tmp_path / "home" / ".cache" / "vllm")}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TRITON_HOME", str(tmp_path / "th"))
    assert cc.local_dirs() == {"vllm": tmp_path / "xdg" / "vllm" / "torch_compile_cache",
                               "triton": tmp_path / "th" / ".triton" / "cache", **derived(tmp_path / "xdg" / "vllm")}
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "v"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "t"))
    assert cc.local_dirs() == {"vllm": tmp_path / "v" / "torch_compile_cache", "triton": tmp_path / "t",
                               **derived(tmp_path / "v")}


def test_the_nodes_vllm_agrees_on_the_cache_root(tmp_path):
    """The rule above, checked against the vLLM the local node runs (its envs.py only: no engine)."""
    python = os.environ.get("MODELFERRY_VLLM_PYTHON")
    if not python:
        pytest.skip("MODELFERRY_VLLM_PYTHON not set")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    got = subprocess.run([python, "-c", "import vllm.envs as e; print(e.VLLM_CACHE_ROOT)"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert got.stdout.strip() == str(tmp_path / "xdg" / "vllm"), got.stderr[-2000:]


def test_the_saver_waits_as_long_as_the_launch_may():
    """Its default outlasts the longest --ready-timeout, and the task passes the one launched with."""
    from modelferry.tasks.launch.options import LaunchOptions
    from modelferry.tasks.launch.skytask import build_task_config

    assert cc.DEFAULT_READY_S > 6 * 3600
    cfg = build_task_config(model_uri="s3://b/models/acme/m/abc/", served_name="acme/m", model_bytes=10**9,
                            weights="r2", options=LaunchOptions(ready_timeout=21600), loader_env={})
    assert cfg["envs"]["READY_TIMEOUT"] == "21600"  # the node program hands it to the saver (test_sky_task.py's jobs)


def test_generated_task_carries_the_cache_steps(sky_home):
    from modelferry.tasks.clients import sky
    from modelferry.tasks.launch import skytask
    from modelferry.tasks.launch.options import LaunchOptions
    from modelferry.tasks.settings import loader_env

    args = dict(model_uri="s3://b/models/acme/m/abc/", served_name="acme/m", model_bytes=10**9, weights="r2",
                loader_env=loader_env("https://acct.r2.cloudflarestorage.com"), bucket="b", revision="abc")
    on = skytask.build_task_config(options=LaunchOptions(), **args)
    task = sky.validate(on, {"AWS_ACCESS_KEY_ID": "k1", "AWS_SECRET_ACCESS_KEY": "s1", "VLLM_API_KEY": "a1"})
    assert task.file_mounts == {"/modelferry/compile_cache.py": str(TOOL), "/modelferry/node.py": str(TOOL.with_name("node.py"))}
    assert on["envs"]["COMPILE_CACHE"] == "on" and on["envs"]["COMPILE_CACHE_BUCKET"] == "b"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(on["envs"])
    for part in ("setup", "run"):
        assert subprocess.run(["bash", "-n", "-c", on[part]]).returncode == 0
    off = skytask.build_task_config(options=LaunchOptions(compile_cache=False), **args)
    assert off["envs"]["COMPILE_CACHE"] == "off"


def test_list_and_gc_see_stored_caches(node_env, tmp_path, cli, s3):
    key = cc.derive_key(**{**BASE, "revision": f"listed-{os.getpid()}"})
    make_tree(tmp_path / "n")
    assert cc.save(key, {"vllm": tmp_path / "n" / "vllm"}).startswith("saved")
    rows = {r["key"]: r for r in cli("list", "--compile-caches", "--json").json()}
    assert rows[key]["files"] == 201 and rows[key]["bytes"] > 0
    dropped = cli("gc", "--compile-cache-days", "0", "--json").json()
    assert key in dropped["removed_compile_caches"]
    assert s3.listing(f"compile-cache/{key}/") == {}


def test_parser_reads_our_restore_line():
    from modelferry.tasks.measure.startlog import parse_vllm_log

    assert parse_vllm_log("modelferry compile cache: hit\n")["compile_cache"] == "hit"
    assert parse_vllm_log("modelferry compile cache: refused: 1 file(s) don't match")["compile_cache"] == "refused"
