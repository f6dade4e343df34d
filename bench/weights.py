"""Weights at real size on the local target: the stream strategy's weights phase against what it
takes this machine to get the same bytes in otherwise, and the node's peak host memory.

Model: `tiny_llama.SIZED` by default (12 layers, hidden 2048, head_dim 128: 1.33 GB of bf16 in 4
shards; seeded, made here), staged from a local directory into `rclone serve s3` on loopback.
Measured in one run:
- GET: `s5cmd cp` of the staged shards to local disk (the bucket's limit here), then vLLM's own
  disk iterator over the files it wrote (`safetensors_weights_iterator`, each tensor copied out);
- the streamer alone (runai-model-streamer in the node's venv, every tensor into CPU memory, then
  with vLLM's per-tensor `clone()`), at each --concurrency, with the buffer the run script sizes and
  with one as big as the checkpoint (what the old `memory_limit: -1` gave), and vLLM's own iterator
  (`runai_safetensors_weights_iterator`, each tensor copied out), free and pinned to one core as
  vLLM's CPU worker is unless told not to; each with its peak RSS, and the CPU seconds it and the
  bucket spent (with the bucket on the same cores, wall time >= CPU seconds / cores);
- with --vllm: `modelferry bench --strategy both` on the local target: vLLM's own weights line for
  stream (Run:ai bar) and prefetch (s5cmd sync in setup, then vLLM's load from disk), "Model loading
  took" for both, and each node's peak host memory (the run script's sampler, in the row).
Baseline (named in the output): the larger of the GET and prefetch's load from disk, what vLLM
itself needs to ingest the bytes here. Goal: stream weights <= 1.2x that.

    .venv/bin/python bench/weights.py [--shards 4] [--layout round-robin] [--kv-heads 4] [--intermediate 5632]
        [--rounds 3] [--concurrency 4,16,32] [--vllm] [--vllm-rounds 3] [--vllm-memory-limit auto,whole,0]
        [--vllm-args=--enforce-eager]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.stage_throughput import in_scratch_dir  # noqa: E402
from modelferry.tasks.clients import processes
from modelferry.tasks.offline import embedded, tiny_llama
from modelferry.tasks.on_node import node  # noqa: E402
from modelferry.tasks.launch.local_target import vllm_python  # noqa: E402
from modelferry.tasks.settings import loader_env  # noqa: E402

GIB = 2**30
MODEL = "bench/sized"
GET = "s5cmd GET to disk"
DISK = "vLLM's disk iterator, the GET's files cached"
PREFETCH = "prefetch (s5cmd sync, then disk)"

# The streamer as vLLM drives it (weight_utils.py runai_safetensors_weights_iterator), timed from
# stream_files to the last tensor; VmHWM: this process's peak RSS.
STREAM = """
import json, os, resource, sys, time
mode = sys.argv[1]
def cpu():
    ru = resource.getrusage(resource.RUSAGE_SELF)  # every thread's, the streamer's readers included
    return ru.ru_utime + ru.ru_stime
t, c = time.perf_counter(), cpu()
n = 0
if mode in ("vllm", "disk"):  # vLLM's own iterators, each tensor then copied out as a weight load does
    import torch
    from vllm.model_executor.model_loader import weight_utils
    t, c = time.perf_counter(), cpu()
    if mode == "vllm":  # the stream strategy's (the streamer's clone() included)
        tensors = weight_utils.runai_safetensors_weights_iterator(sys.argv[2:], False)
    else:  # the default loader's, prefetch's load from local disk
        tensors = weight_utils.safetensors_weights_iterator(sys.argv[2:], False)
    for name, tensor in tensors:
        torch.empty_like(tensor).copy_(tensor)
        n += tensor.nbytes
else:
    from runai_model_streamer import SafetensorsStreamer
    with SafetensorsStreamer() as s:
        s.stream_files(sys.argv[2:], device="cpu", is_distributed=False)
        for name, tensor in s.get_tensors():
            n += (tensor.clone() if mode == "clone" else tensor).nbytes
took, spent = time.perf_counter() - t, cpu() - c
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"s": took, "cpu": spent, "bytes": n, "peak": hwm}))
"""


def sized_limit(files: tuple[int, ...]) -> int:
    """The buffer the node program's rule gives on this host for one GPU, from MemAvailable now,
    under the ring these weights want."""
    avail = node.meminfo_available(Path("/proc/meminfo").read_text())
    return node.memory_limit(avail, 1, node.ring_bytes(sum(files), max(files, default=0)))


def timed(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} failed: {proc.stderr[-3000:]}")
    return time.perf_counter() - t, proc


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) of process `pid`, or of this process's waited-for children."""
    if pid is None:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(cmd: list[str], env: dict, bucket_pid: int) -> tuple[float, float, float, subprocess.CompletedProcess]:
    """`cmd`'s wall seconds, the CPU seconds it and the bucket spent, and its outcome: on a machine
    whose cores the bucket shares, a method's wall time is bounded below by that CPU over the cores."""
    mine, bucket = cpu_seconds(), cpu_seconds(bucket_pid)
    took, proc = timed(cmd, env)
    return took, cpu_seconds() - mine, cpu_seconds(bucket_pid) - bucket, proc


def vllm_row(env: dict, results: Path, strategy: str, vllm_args: str, context: int, extra: list[str]) -> dict:
    """One `modelferry bench` start on the local target, its row and the node's log (kept under
    `results`: the bar's progress lines say how the weights phase went)."""
    _, proc = timed([sys.executable, "-m", "modelferry.flows", "bench", MODEL, "--target", "local", "--strategy",
                     strategy, "--runs", "1", f"--extra-vllm-args={vllm_args}", "--max-model-len", str(context),
                     "--results", str(results), "--json", *extra], env)
    (row,) = json.loads(proc.stdout)
    return row


def run(work: Path, args) -> int:
    shape = tiny_llama.Shape(args.layers, args.hidden, args.intermediate, head_dim=128, kv_heads=args.kv_heads)
    t = time.perf_counter()
    total = tiny_llama.write_checkpoint(work / "ckpt", shape, args.shards, args.layout)
    print(f"checkpoint: {total / 1e9:.2f} GB of weights in {args.shards} {args.layout} shards, made in "
          f"{time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    conc = [int(c) for c in args.concurrency.split(",")]
    got: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    peaks: dict[str, int] = {}
    with embedded.rclone_bucket(work / "data", "bench", "bench-access-1", "bench-secret-1") as bucket, \
            embedded.prefect_server(work / "prefect") as api:
        env = dict(os.environ, **bucket.env(), PREFECT_API_URL=api, PREFECT_HOME=str(work / "prefect"),
                   MODELFERRY_CACHE=str(work / "cache"))
        node_env = dict(os.environ, AWS_ACCESS_KEY_ID=bucket.access_key, AWS_SECRET_ACCESS_KEY=bucket.secret_key,
                        **loader_env(bucket.endpoint))
        timed([sys.executable, "-m", "modelferry.flows", "stage", str(work / "ckpt"), "--name", MODEL], env)
        rev = next((bucket.root / "bench" / "models" / MODEL).iterdir()).name
        files = sorted((work / "ckpt").glob("*.safetensors"))
        shards = [p.name for p in files]
        urls = [f"s3://bench/models/{MODEL}/{rev}/{name}" for name in shards]
        limit = sized_limit(tuple(p.stat().st_size for p in files))
        whole = total + 64 * 2**20
        for r in range(args.rounds):  # interleaved: the machine's noise spreads over every method
            get_dir = work / "get"
            took, spent, served, _ = measured([processes.which("s5cmd"), "--endpoint-url", bucket.endpoint, "cp",
                                       f"s3://bench/models/{MODEL}/{rev}/*.safetensors", f"{get_dir}/"], node_env,
                                      bucket.proc.pid)
            got.setdefault(GET, []).append(took)
            cpu.setdefault(GET, []).append(spent + served)
            subprocess.run(["sync"], check=True)  # the GET's writeback is not the next method's cost
            _, proc = timed([vllm_python(), "-c", STREAM, "disk", *(str(get_dir / n) for n in shards)], node_env)
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            got.setdefault(DISK, []).append(out["s"])
            cpu.setdefault(DISK, []).append(out["cpu"])
            shutil.rmtree(get_dir)
            for c in conc:
                for label, mode, mem, pin in (
                        ("streamer c={} sized buffer", "plain", limit, []),
                        ("streamer c={} checkpoint-sized buffer", "plain", whole, []),
                        ("streamer c={} sized buffer + clone", "clone", limit, []),
                        ("vLLM's iterator c={}", "vllm", limit, []),
                        # as vLLM's CPU worker runs it when pinned (VLLM_CPU_OMP_THREADS_BIND=auto)
                        ("vLLM's iterator c={}, pinned to one core", "vllm", limit, ["taskset", "-c", "0"])):
                    label = label.format(c)
                    stream_env = {**node_env, "RUNAI_STREAMER_CONCURRENCY": str(c),
                                  "RUNAI_STREAMER_MEMORY_LIMIT": str(mem)}
                    _, _, served, proc = measured([*pin, vllm_python(), "-c", STREAM, mode, *urls], stream_env,
                                                  bucket.proc.pid)
                    out = json.loads(proc.stdout.strip().splitlines()[-1])
                    assert out["bytes"] == total, (out, total)
                    got.setdefault(label, []).append(out["s"])
                    cpu.setdefault(label, []).append(out["cpu"] + served)  # the bucket idles while torch imports
                    peaks[label] = max(peaks.get(label, 0), out["peak"])
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        starts: dict[str, list[dict]] = {}
        if args.vllm:
            results = Path(args.results).resolve() / time.strftime("%Y%m%dT%H%M%S")
            print(f"vLLM starts: rows and node logs under {results}", file=sys.stderr, flush=True)
            for r in range(args.vllm_rounds):  # interleaved, as the rounds above
                starts.setdefault(PREFETCH, []).append(
                    vllm_row(env, results / f"prefetch-{r}", "prefetch", args.vllm_args, args.max_model_len, []))
                for c in args.vllm_concurrency.split(","):
                    for mem in args.vllm_memory_limit.split(","):
                        flags = ((["--concurrency", c] if c != "auto" else [])
                                 + (["--memory-limit", str(whole if mem == "whole" else mem)] if mem != "auto" else []))
                        starts.setdefault(f"stream c={c} memory_limit={mem}", []).append(
                            vllm_row(env, results / f"stream-c{c}-m{mem}-{r}", "stream", args.vllm_args,
                                     args.max_model_len, flags))
    print(f"\n{total / 1e9:.2f} GB in {args.shards} {args.layout} shards (layers {shape.layers}, hidden {shape.hidden}, "
          f"intermediate {shape.intermediate}, KV heads {shape.kv} of {shape.heads}), loopback "
          f"rclone, {os.cpu_count()} cores; median of {args.rounds} interleaved rounds; sized buffer "
          f"{limit / GIB:.2f} GiB, checkpoint-sized {whole / GIB:.2f} GiB")
    print("CPU s: the method's own (from its first read to its last tensor; s5cmd's whole run) and the bucket's")
    print(f"{'method':46s} {'seconds':>8s} {'GB/s':>6s} {'CPU s':>6s} {'peak RSS GiB':>13s}")
    for label, runs in got.items():
        med = statistics.median(runs)
        peak = f"{peaks[label] / GIB:13.2f}" if label in peaks else ""
        print(f"{label:46s} {med:8.2f} {total / med / 1e9:6.2f} {statistics.median(cpu[label]):6.2f} {peak}")
    get_s = statistics.median(got[GET])
    if starts:
        base = max(get_s, statistics.median(row["weights_s"] for row in starts[PREFETCH]))
        print(f"\nvLLM on the local target, median of {args.vllm_rounds} interleaved starts each; baseline max(GET "
              f"{get_s:.2f} s, prefetch's load from disk) = {base:.2f} s; goal: stream weights <= 1.2x baseline")
        print(f"{'start':34s} {'weights s':>9s} {'range':>11s} {'x base':>7s} {'setup s':>8s} {'total s':>8s} "
              f"{'max peak GiB':>14s}")
        for label, rows in starts.items():
            weights = [row["weights_s"] for row in rows]
            med = statistics.median(weights)
            print(f"{label:34s} {med:9.2f} {min(weights):5.2f}-{max(weights):<5.2f} {med / base:7.2f} "
                  f"{statistics.median(row['setup_s'] for row in rows):8.1f} "
                  f"{statistics.median(row['total_s'] for row in rows):8.1f} "
                  f"{max(row['host_peak_gib'] for row in rows):14}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=tiny_llama.SIZED.layers)
    ap.add_argument("--hidden", type=int, default=tiny_llama.SIZED.hidden)
    ap.add_argument("--intermediate", type=int, default=tiny_llama.SIZED.intermediate)
    ap.add_argument("--kv-heads", type=int, help="grouped-query attention: KV heads (default: as many as heads)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--layout", choices=tiny_llama.LAYOUTS, default="contiguous", help="how the tensors are spread "
                    "over the shards: contiguous runs of layers, or dealt round-robin (every file holds part of "
                    "every layer)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", default="4,16,32", help="streamer concurrencies to try, comma-separated")
    ap.add_argument("--vllm", action="store_true", help="also start vLLM: prefetch once, stream per concurrency "
                    "and memory limit (about 2.5 min a start here)")
    ap.add_argument("--vllm-rounds", type=int, default=1, help="starts of each kind, interleaved (the median is "
                    "reported)")
    ap.add_argument("--vllm-concurrency", default="auto", help="stream starts: --concurrency values (auto: the "
                    "run script's choice)")
    ap.add_argument("--vllm-memory-limit", default="auto", help="stream starts: --memory-limit values (auto: sized "
                    "by the run script; whole: as big as the checkpoint, what memory_limit -1 gave)")
    ap.add_argument("--vllm-args", default="", help="vLLM's extra arguments for every start (--enforce-eager for "
                    "a start of about 40 s instead of 2.5 min: the weights come before the compile)")
    ap.add_argument("--max-model-len", type=int, default=512, help="the context every start serves (default 512)")
    ap.add_argument("--results", default="results/bench-weights", help="where the vLLM rows and node logs go")
    return in_scratch_dir("mf-bench-weights-", run, ap.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
