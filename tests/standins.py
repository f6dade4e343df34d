"""Test-only stand-ins: moto's S3 server (S3's own multipart ETags and checksums) and a real Dask
cluster on loopback. The embedded bucket, Hub and Prefect server are product code
(`modelferry.tasks.offline.embedded`); these are not."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

from modelferry.tasks.offline.embedded import LocalBucket
from modelferry.tasks.clients.processes import free_port, start, stop, wait_http, which


@contextlib.contextmanager
def moto_bucket(workdir: Path, bucket: str, access_key: str = "motokey", secret_key: str = "motosecret"):
    """moto's S3 server: S3-style multipart ETags, for the checks that need them."""
    port = free_port()
    env = dict(os.environ, TMPDIR=str(workdir))
    proc = start([which("moto_server"), "-H", "127.0.0.1", "-p", str(port)], workdir / "moto.log", env)
    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/", 30, proc)
        import boto3

        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                     aws_access_key_id=access_key, aws_secret_access_key=secret_key).create_bucket(Bucket=bucket)
        yield LocalBucket(f"http://127.0.0.1:{port}", bucket, access_key, secret_key, proc)
    finally:
        stop(proc)


@contextlib.contextmanager
def dask_cluster(workdir: Path, env: dict[str, str], workers: int = 2):
    """A real Dask cluster on loopback: `dask scheduler` and `workers` worker processes, each with
    `env` and its own MODELFERRY_CACHE and HF_HOME (workdir/worker-N), as separate machines would have. Yields
    the scheduler address."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [start([which("dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                    "--no-dashboard"], workdir / "scheduler.log", env)]
    try:
        _wait_port(port, 60, procs[0])
        for i in range(workers):
            procs.append(start([which("dask"), "worker", address, "--nworkers", "1", "--nthreads", "2",
                                "--no-dashboard", "--local-directory", str(workdir / f"worker-{i}" / "dask")],
                               workdir / f"worker-{i}.log",
                               dict(env, MODELFERRY_CACHE=str(workdir / f"worker-{i}" / "cache"),
                                    HF_HOME=str(workdir / f"worker-{i}" / "hf"))))
        _wait_workers(address, workers, 60)
        yield address
    finally:
        for proc in reversed(procs):
            stop(proc)


def _wait_port(port: int, timeout: float, proc) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


def _wait_workers(address: str, n: int, timeout: float) -> None:
    from distributed import Client

    with Client(address, timeout=timeout) as client:
        client.wait_for_workers(n, timeout=timeout)
