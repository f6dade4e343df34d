"""Carry vLLM's compile caches between spot nodes through the bucket.

This file runs in two places: imported here (key derivation, listing, gc, tests) and shipped to
the GPU node by the SkyPilot task (`file_mounts`), where `python3 compile_cache.py key|restore|save`
runs with only the standard library and s5cmd. It never blocks serving: every failure is logged
and the command exits 0.

Layout: compile-cache/<key>/files/{vllm,triton}/...  and  compile-cache/<key>/manifest.json
(written last: files, sizes, sha256). A cache whose manifest doesn't verify is not restored.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PREFIX = "compile-cache"
DEFAULT_READY_S = 24 * 3600  # longer than any --ready-timeout (21600 s at most)


# What else vLLM 0.32 derives under VLLM_CACHE_ROOT and checks itself before using, so that a node
# of the same cache key (model, vLLM, GPU type and count) may take another's:
DERIVED = {
    # model_executor/models/registry.py _LazyRegisteredModel: each model class's inspection (else
    # re-run in a subprocess that imports torch at every start), stored with a hash of the class's
    # source file and ignored when that differs.
    "modelinfos": "modelinfos",
    # v1/worker/startup_plan.py (VLLM_ENABLE_STARTUP_PLAN=1, GPU workers only): the memory-profiling
    # result, fingerprinted by vLLM's config hash, device name, total memory, capability, torch,
    # CUDA, rank and world size, and applied only where free memory is at least what it was.
    "startup_plan": "startup_plan",
    # model_executor/warmup/flashinfer_autotune_cache.py: FlashInfer's kernel choices, under its
    # per-architecture workspace name and the config hash (GPU only).
    "flashinfer_autotune": "flashinfer_autotune_cache",
}
# Not carried: gpu_p2p_access_cache_for_<CUDA_VISIBLE_DEVICES>.json (distributed/device_communicators/
# all_reduce_utils.py), which GPU pairs can reach each other. It is keyed by device ids alone and
# holds only for the same instance topology, which our key (GPU type and count) does not pin; a
# wrong matrix would turn custom all-reduce on where P2P fails.


def local_dirs() -> dict[str, Path]:
    """Where this node's vLLM keeps what a restart reuses, found the way vLLM and Triton find them.
    vLLM's torch_compile_cache holds its AOT-compiled model and the inductor artifacts it needs;
    `DERIVED` the rest it checks itself. vLLM 0.32 (envs.py): VLLM_CACHE_ROOT, else
    $XDG_CACHE_HOME/vllm, else ~/.cache/vllm; Triton 3.x (knobs.py): TRITON_CACHE_DIR, else
    $TRITON_HOME/.triton/cache, else ~/.triton/cache. Read with os.getenv and a default, as vLLM
    does: a variable set but empty counts as set."""
    xdg_cache = os.getenv("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    vllm_root = Path(os.path.expanduser(os.getenv("VLLM_CACHE_ROOT", os.path.join(xdg_cache, "vllm"))))
    triton_home = os.getenv("TRITON_HOME", os.path.expanduser("~/"))
    triton = os.getenv("TRITON_CACHE_DIR", os.path.join(triton_home, ".triton", "cache"))
    return {"vllm": vllm_root / "torch_compile_cache", "triton": Path(triton),
            **{name: vllm_root / sub for name, sub in DERIVED.items()}, "inductor_headers": _inductor_headers()}


def _inductor_headers() -> Path:
    """Where inductor's C++ backend (vLLM on a CPU) keeps its precompiled headers, outside vLLM's
    folder: torch 2.13 _inductor/codecache.py _HEADER_DIR, under runtime/cache_dir_utils.py
    default_cache_dir() ($TMPDIR/torchinductor_<user>, the user name sanitised the same way). Each
    is named by a hash of its compiler command line, the preprocessed header and the compiler's
    version, and gcc ignores one built for other options; building them is what a fresh CPU node's
    warm-up redoes that a restart does not (149 MB for the tiny model here). A GPU node's kernels
    are Triton's: it writes none."""
    import getpass
    import re

    try:
        user = getpass.getuser()
    except (KeyError, ModuleNotFoundError, OSError):
        user = f"uid_{os.getuid()}"
    return Path(tempfile.gettempdir()) / ("torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user)) / "precompiled_headers"


def derive_key(*, model_uri: str, revision: str, vllm_version: str, gpu: str, tensor_parallel: int | str,
               compile_options: str = "", strategy: str = "") -> str:
    """Changes whenever the compiled artifacts could: model revision, vLLM version (as the node's vLLM
    reports it), GPU type, tensor-parallel size, the options passed to vLLM that shape compilation,
    and the load strategy: vLLM hashes the model's local path (the streamer's download dir, or the
    prefetch dir) into its own cache key, so one strategy's cache is of no use to the other."""
    inputs = {"model": model_uri.rstrip("/"), "revision": revision, "vllm": vllm_version,
              "gpu": gpu.strip().lower(), "tp": str(tensor_parallel), "options": " ".join(compile_options.split()),
              "strategy": strategy}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def _log(msg: str) -> None:
    print(f"modelferry compile cache: {msg}", file=sys.stderr, flush=True)


def _s5cmd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    # Two retries, not s5cmd's ten with backoff (about 50 s against a dead endpoint): the restore runs
    # before vLLM starts, and a cache is never worth delaying the server for.
    cmd = [os.environ.get("S5CMD", "s5cmd"), "--retry-count", "2", "--endpoint-url", os.environ["AWS_ENDPOINT_URL"],
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def _root() -> str:
    return f"s3://{os.environ['COMPILE_CACHE_BUCKET']}/{PREFIX}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _walk(dirs: dict[str, Path]) -> list[dict]:
    out = []
    for name, base in dirs.items():
        if base.is_dir():
            for p in sorted(base.rglob("*")):
                if p.is_file() and not p.is_symlink():
                    out.append({"path": f"{name}/{p.relative_to(base).as_posix()}", "size": p.stat().st_size,
                                "sha256": _sha256(p)})
    return out


def save(key: str, dirs: dict[str, Path] | None = None) -> str:
    """Upload the caches under `key` unless that key is stored already. Returns what happened."""
    dirs = dirs or local_dirs()
    if _s5cmd("ls", f"{_root()}/{key}/manifest.json", check=False).returncode == 0:
        return "already stored"
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "files"
        for name, base in dirs.items():
            if base.is_dir():
                shutil.copytree(base, stage / name, symlinks=False)
        # hash the frozen copy we upload, not the live dirs vLLM may still be writing
        files = _walk({name: stage / name for name in dirs})
        if not files:
            return "nothing to save"
        upload = _s5cmd("cp", f"{stage}/*", f"{_root()}/{key}/files/", check=False)
        if upload.returncode:
            denied = "AccessDenied" in upload.stderr or "403" in upload.stderr
            return "not saved: " + ("these keys are read-only (restore works, save needs write keys)" if denied
                                    else upload.stderr.strip().splitlines()[-1][:200] if upload.stderr.strip() else "s5cmd failed")
        manifest = Path(tmp) / "manifest.json"
        manifest.write_text(json.dumps({"key": key, "saved_at": time.time(), "files": files}, indent=1))
        if _s5cmd("cp", str(manifest), f"{_root()}/{key}/manifest.json", check=False).returncode:
            return "not saved: manifest upload failed"
    return f"saved {len(files)} files, {sum(f['size'] for f in files)} bytes"


def restore(key: str, dirs: dict[str, Path] | None = None) -> str:
    """Restore the caches for `key`: hit, miss, or refused (a file doesn't match its manifest)."""
    dirs = dirs or local_dirs()
    got = _s5cmd("cat", f"{_root()}/{key}/manifest.json", check=False)
    if got.returncode:
        return "miss"
    try:
        files = json.loads(got.stdout)["files"]
    except (ValueError, KeyError):
        return "refused: unreadable manifest"
    with tempfile.TemporaryDirectory() as tmp:
        fetched = Path(tmp) / "files"
        fetched.mkdir()
        if _s5cmd("cp", f"{_root()}/{key}/files/*", f"{fetched}/", check=False).returncode:
            return "refused: download failed"
        bad = []
        for f in files:
            if f["path"].startswith("/") or ".." in Path(f["path"]).parts:
                return f"refused: unsafe path {f['path']!r} in the manifest"
            p = fetched / f["path"]
            if f["size"] == 0 and not p.exists():  # zero-byte objects some tools skip
                p.parent.mkdir(parents=True, exist_ok=True)
                p.touch()
            if not p.is_file() or p.stat().st_size != f["size"] or _sha256(p) != f["sha256"]:
                bad.append(f["path"])
        if bad:
            return f"refused: {len(bad)} file(s) don't match the manifest ({', '.join(bad[:3])})"
        for f in files:  # only what the manifest lists and we just checked
            name, _, rel = f["path"].partition("/")
            if name in dirs:
                dest = dirs[name] / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(fetched / f["path"], dest)
    return "hit"


def node_key() -> str:
    """The key on a node, from the task's environment, the node's vLLM and the GPU it got."""
    gpu = os.environ.get("MF_GPU_NAME") or _gpu_name()
    return derive_key(model_uri=os.environ["MODEL_URI"], revision=os.environ.get("MODEL_REVISION", ""),
                      vllm_version=vllm_version(), gpu=gpu,
                      tensor_parallel=os.environ.get("SKYPILOT_NUM_GPUS_PER_NODE", "1"),
                      compile_options=os.environ.get("EXTRA_VLLM_ARGS", ""),
                      strategy=os.environ.get("LOAD_STRATEGY", ""))


def vllm_version() -> str:
    """The version of the vLLM this node's python3 imports, read from its _version.py (importing
    vLLM takes seconds to tens of seconds)."""
    import importlib.util
    import re

    spec = importlib.util.find_spec("vllm")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        source = Path(folder) / "_version.py"
        found = source.is_file() and re.search(r"__version__ = version = '([^']+)'", source.read_text())
        if found:
            return found.group(1)
    return "unknown"


def _gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout
        return out.splitlines()[0] if out.strip() else "cpu"
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"


def _wait_ready(url: str, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1)
    return False


def _stopped(signum, frame) -> None:
    _log("not saved: the job ended first")
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["key"]:
            print(node_key())
        elif argv[:1] == ["restore"]:
            _log(restore(argv[1]))
        elif argv[:1] == ["save-when-ready"]:
            # The task passes --ready-timeout (at most 6 h), and stops the saver when vLLM exits: then
            # an upload in flight is killed (subprocess.run kills its child on SystemExit) and the
            # staging copy removed; no manifest was written, so nothing half-saved is ever restored.
            signal.signal(signal.SIGTERM, _stopped)
            if _wait_ready(argv[2], float(argv[3]) if len(argv) > 3 else DEFAULT_READY_S):
                _log(save(argv[1]))
            else:
                _log("not saved: the server never became ready")
        else:
            print("usage: compile_cache.py key | restore KEY | save-when-ready KEY HEALTH_URL [TIMEOUT]", file=sys.stderr)
            return 2
    except Exception as exc:  # never block serving
        _log(f"skipped after an error: {type(exc).__name__}: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
