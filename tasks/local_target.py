"""The local target: a stand-in for a GPU node that runs the *generated* SkyPilot task's setup
script and then, instead of `vllm serve`, this server. It loads the staged weights the way the task
says (Run:ai streamer over S3, or s5cmd prefetch then safetensors), into GPU memory when torch sees
a GPU, else CPU, and answers /health, /v1/models and /v1/completions with a labelled, trivial reply.

It measures the weight path, not vLLM. Its log lines use vLLM's formats so the same parser reads both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from modelferry.tasks.errors import ModelferryError

LABEL = "[modelferry local target, not vLLM]"


def _say(msg: str) -> None:
    print(f"INFO {time.strftime('%m-%d %H:%M:%S')} {LABEL} {msg}", flush=True)


def _s3_files(uri: str) -> list[str]:
    """Every *.safetensors under an s3:// prefix, listed the way vLLM does before streaming."""
    import boto3
    from botocore.config import Config

    bucket, _, prefix = uri[len("s3://"):].partition("/")
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                      config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required"))
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(".safetensors")]
    return [f"s3://{bucket}/{k}" for k in sorted(keys)]


def load_weights(strategy: str, model_uri: str, prefetch_dir: str, device: str) -> tuple[int, int]:
    """Load every safetensors tensor onto `device`. Returns (tensors, bytes)."""
    import torch

    kept, nbytes = [], 0
    if strategy == "stream":
        from runai_model_streamer import SafetensorsStreamer

        files = _s3_files(model_uri)
        if not files:
            raise ModelferryError(f"no *.safetensors under {model_uri}")
        with SafetensorsStreamer() as streamer:
            streamer.stream_files(files)
            for _, tensor in streamer.get_tensors():
                t = tensor.to(device, non_blocking=True) if device != "cpu" else tensor.clone()
                kept.append(t)
                nbytes += t.numel() * t.element_size()
    elif strategy == "prefetch":
        from safetensors import safe_open

        files = sorted(Path(prefetch_dir).rglob("*.safetensors"))
        if not files:
            raise ModelferryError(f"no *.safetensors in {prefetch_dir}: did setup run?")
        for f in files:
            with safe_open(str(f), framework="pt", device=device) as h:
                for k in h.keys():
                    t = h.get_tensor(k)
                    kept.append(t)
                    nbytes += t.numel() * t.element_size()
    else:
        raise ModelferryError(f"the local target loads staged weights only (strategy {strategy!r}); use --source r2")
    if device != "cpu":
        torch.cuda.synchronize()
    _keep.extend(kept)
    return len(kept), nbytes


_keep: list = []


def serve() -> int:
    """Entry point of the server process; configured by the task's envs and secrets."""
    t0 = time.perf_counter()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    strategy, uri = os.environ["LOAD_STRATEGY"], os.environ["MODEL_URI"]
    os.environ.setdefault("RUNAI_STREAMER_CONCURRENCY", os.environ.get("LOADER_CONCURRENCY", "32"))
    if os.environ.get("LOADER_MEMORY_LIMIT", "-1") != "-1":
        os.environ.setdefault("RUNAI_STREAMER_MEMORY_LIMIT", os.environ["LOADER_MEMORY_LIMIT"])
    _say(f"loading {uri if strategy == 'stream' else os.environ['PREFETCH_DIR']} ({strategy}) onto {device}")
    t = time.perf_counter()
    tensors, nbytes = load_weights(strategy, uri, os.environ.get("PREFETCH_DIR", ""), device)
    took = time.perf_counter() - t
    _say(f"Loading weights took {took:.2f} seconds")
    _say(f"Model loading took {nbytes / 2**30:.4f} GiB and {time.perf_counter() - t0:.6f} seconds")
    t = time.perf_counter()
    name, key = os.environ.get("SERVED_MODEL_NAME", "model"), os.environ.get("VLLM_API_KEY", "")
    reply = f"{LABEL} {tensors} tensors, {nbytes / 1e9:.3f} GB on {device}; this is not a language model."
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["VLLM_PORT"])), _handler(name, key, reply))
    _say(f"init engine (profile, create kv cache, warmup model) took {time.perf_counter() - t:.2f} seconds")
    _say(f"serving {name} on http://127.0.0.1:{server.server_address[1]}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def _handler(name: str, api_key: str, reply: str):
    class Handler(BaseHTTPRequestHandler):
        def _json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if api_key and self.headers.get("Authorization") != f"Bearer {api_key}":
                self._json(401, {"error": "Unauthorized"})
                return False
            return True

        def do_GET(self):
            if self.path == "/health":
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/v1/models" and self._authorized():
                self._json(200, {"object": "list", "data": [{"id": name, "object": "model", "owned_by": LABEL}]})
            elif self.path != "/v1/models":
                self._json(404, {"error": "not found"})

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path != "/v1/completions":
                return self._json(404, {"error": "not found"})
            if not self._authorized():
                return
            req = json.loads(body or b"{}")
            if req.get("model") != name:
                return self._json(404, {"error": f"model {req.get('model')!r} does not exist"})
            self._json(200, {"object": "text_completion", "model": name,
                             "choices": [{"index": 0, "text": reply, "finish_reason": "stop"}]})

        def log_message(self, *args):
            pass

    return Handler


# --- running the generated task locally ------------------------------------------------------------

@dataclass
class LocalNode:
    """One "node": a work dir (its disk), the task's environment, and the server process."""

    workdir: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    log: Path | None = None
    marks: dict[str, float] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['VLLM_PORT']}"


def node_env(cfg: dict, secrets: dict[str, str], workdir: Path, port: int) -> dict[str, str]:
    """Exactly the task's envs and secrets, plus what SkyPilot would set, on a clean PATH."""
    env = {k: str(v) for k, v in cfg["envs"].items()}
    env.update({k: v for k, v in secrets.items() if v})
    env.update(PREFETCH_DIR=str(workdir / "model"), VLLM_PORT=str(port), SKYPILOT_NUM_GPUS_PER_NODE="1",
               PATH=f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin", HOME=str(workdir),
               PYTHONUNBUFFERED="1")
    return env


def run_setup(node: LocalNode, cfg: dict, timeout: float = 1800) -> None:
    """Run the task's own `setup` script, as SkyPilot would on the node."""
    log = node.workdir / "setup.log"
    with open(log, "ab") as out:
        proc = subprocess.run(["bash", "-c", cfg.get("setup") or "true"], env=node.env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=timeout, cwd=node.workdir)
    if proc.returncode:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise ModelferryError(f"task setup failed (exit {proc.returncode}): {' | '.join(tail)}")


def start_server(node: LocalNode) -> None:
    node.log = node.workdir / f"server-{time.time_ns()}.log"
    with open(node.log, "wb") as out:
        node.proc = subprocess.Popen([sys.executable, "-m", "modelferry.tasks.local_target"], env=node.env, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=Path(__file__).resolve().parent.parent)


def stop_server(node: LocalNode) -> None:
    from modelferry.tasks.processes import stop

    if node.proc is not None:
        stop(node.proc)
        node.proc = None


if __name__ == "__main__":
    sys.exit(serve())
