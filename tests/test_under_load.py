"""A busy bucket and a rate-limited Hub, through loopback proxies of our own (bench/throttle.py) in
front of the real local bucket (rclone) and the offline Hub (olah): the first try of chosen requests
gets the answer a busy S3/R2 or huggingface.co gives, every retry of the same request goes through."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from bench.throttle import Faulty, every_nth_first_try
from modelferry.tasks import settings as config
from modelferry.tasks.offline import tiny_llama
from modelferry.tasks.errors import HubRateLimited, TransferError
from modelferry.tasks.clients.transfer import Upload, Uploader
from tests.helpers import TINY, MiB, steps_by_name


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_a_multipart_stage_through_a_throttling_bucket_keeps_its_parts(cli, bucket, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for name in ("a.safetensors", "b.safetensors"):  # 3 parts each at the 50 MiB part size
        (model / name).write_bytes(os.urandom(110 * MiB))
    # The first try of every third request of each kind: creates, parts, completes, heads, listings.
    with Faulty(_port(bucket.endpoint), every_nth_first_try(3)) as proxy:
        run = cli("stage", str(model), "--name", "load/throttled", "--allow-unloadable", "--json",
                  extra_env={"R2_ENDPOINT": proxy.url})
    assert run.rc == 0, run
    rows = steps_by_name(run.json())
    assert rows["upload"]["attempts"] == 1 and rows["upload"]["files"] == 3, rows  # no step retry
    throttled = {kind for kind, *_ in proxy.log if _[-1] in (429, 500, 503)}
    assert {"create", "part", "complete"} <= throttled, proxy.log
    # Each file's multipart upload was created once and sent its first part once: none started over.
    for name in ("a.safetensors", "b.safetensors"):
        created = [e for e in proxy.answered(200, "create") if e[1].endswith(name)]
        first_parts = [e for e in proxy.answered(200, "part") if e[1].endswith(name) and "partNumber=1&" in e[2] + "&"]
        assert len(created) == 1 and len(first_parts) == 1, (name, created, first_parts)
    assert cli("verify", "load/throttled", "--deep").rc == 0


def test_a_bucket_that_stops_answering_ends_the_upload_at_the_stall_deadline(bucket, tmp_path):
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(120 * MiB))
    with Faulty(_port(bucket.endpoint), lambda *_: None) as proxy:
        settings = config.load({**bucket.env(), "R2_ENDPOINT": proxy.url})
        proxy.blackhole()  # accepts connections, never answers: no request timeout ends this
        started = time.monotonic()
        with pytest.raises(TransferError) as caught:
            with Uploader(settings, 50 * MiB, stall_s=2) as up:
                up.submit(Upload(source, "load/stalled/big.bin", source.stat().st_size))
                up.close()
    took = time.monotonic() - started
    assert took < 15, took
    message = str(caught.value)
    assert "no byte moved for 2 s" in message and "load/stalled/big.bin" in message and proxy.url in message
    assert not caught.value.transient


def _hub_rule(limited: str, reset_s: int):
    """huggingface.co's 429: `RateLimit` and `RateLimit-Policy` as huggingface_hub 1.16's
    parse_ratelimit_headers (utils/_http.py) reads them, on the first try of `limited` API calls."""
    def rule(method, path, query):
        if not path.startswith("/api/models/") or limited not in path:
            return None
        return (429, {"RateLimit": f'"api";r=0;t={reset_s}', "RateLimit-Policy": '"fixed window";"api";q=500;w=300',
                      "Content-Type": "application/json"}, b'{"error": "You have been rate-limited"}')
    return rule


def test_the_hubs_rate_limit_is_waited_out_as_its_header_says(cli, hub):
    with Faulty(_port(hub), _hub_rule("", 1)) as proxy:  # model_info and the file listing, once each
        started = time.monotonic()
        run = cli("stage", TINY, "--name", "load/hub-limited", "--json", extra_env={"HF_ENDPOINT": proxy.url})
        took = time.monotonic() - started
    assert run.rc == 0, run
    assert run.err.count("rate-limited") >= 2 and "waiting 2 s as its RateLimit header says" in run.err, run.err[-2000:]
    assert took >= 4
    assert len(proxy.answered(429)) >= 2


def test_a_rate_limit_past_the_bound_is_one_error_naming_hf_token(hub, monkeypatch):
    from modelferry.tasks.clients import hub as hubs

    monkeypatch.setenv("MODELFERRY_HUB_WAIT_S", "5")
    with Faulty(_port(hub), _hub_rule("", 55)) as proxy:
        started = time.monotonic()
        with pytest.raises(HubRateLimited) as caught:
            hubs.resolve(TINY, None, [], [], endpoint=proxy.url)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert "429" in message and "MODELFERRY_HUB_WAIT_S=5" in message and "HF_TOKEN" in message, message


STREAM = """
import sys
from runai_model_streamer import SafetensorsStreamer
with SafetensorsStreamer() as s:
    s.stream_files(sys.argv[1:])
    print("tensors", sum(t.numel() for _, t in s.get_tensors()))
"""


@pytest.mark.parametrize("status,node_env,streams", [(503, False, True), (500, False, True), (429, False, False),
                                                    (429, True, True)])
def test_what_the_pinned_streamer_does_with_a_throttled_ranged_get(bucket, s3, tmp_path, status, node_env, streams):
    """runai-model-streamer 0.17 reads S3 through the AWS CRT client, which retries 500 and 503 per
    range and not 429 (AWS_MAX_ATTEMPTS changes nothing there): unset, one 429 fails the file ('File
    access error'), as R2's 429 during a fleet's cold start would fail vLLM's load. The node program
    sets the streamer's own retry window (RUNAI_STREAMER_S3_TIMEOUT, node.streamer_retry_s), under
    which the same 429s are retried and the load finishes. Pinned both ways, so an upgrade that
    changes either shows."""
    from modelferry.tasks.on_node import node
    from modelferry.tasks.launch.local_target import vllm_python
    from bench.throttle import S3_ERRORS

    shards = {k: v for k, v in tiny_llama.files().items() if k.endswith(".safetensors")}
    for name, data in shards.items():
        s3.put_bytes(f"load/streamed/{name}", data if isinstance(data, bytes) else Path(data).read_bytes())
    errors = [e for e in S3_ERRORS if e[0] == status]
    retry = {"RUNAI_STREAMER_S3_TIMEOUT": str(node.streamer_retry_s(300))} if node_env else {}
    with Faulty(_port(bucket.endpoint), every_nth_first_try(1, kinds={"get"}, errors=errors)) as proxy:
        env = dict(os.environ, AWS_ACCESS_KEY_ID=bucket.access_key,
                   AWS_SECRET_ACCESS_KEY=bucket.secret_key, **config.loader_env(proxy.url), **retry)
        run = subprocess.run([vllm_python(), "-c", STREAM, *(f"s3://{bucket.bucket}/load/streamed/{n}" for n in shards)],
                             env=env, capture_output=True, text=True, timeout=120)
    assert proxy.answered(status), proxy.log  # every range's first try was refused
    if streams:
        assert run.returncode == 0 and "tensors" in run.stdout, run.stderr[-2000:]
    else:
        assert run.returncode != 0 and "File access error" in run.stderr, run.stderr[-2000:]
