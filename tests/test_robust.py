"""Issue 13, as a new user and a reliability engineer would meet it, against the real local parts:
Ctrl-C and SIGTERM, damaged bucket state, refusals before any write, time to error on a dead
endpoint, Prefect's start-up, the lock's takeover race, and what the terminal shows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelferry.tasks.clients import processes
from modelferry.tasks.offline import embedded
from modelferry.tasks.records import catalog, layout
from modelferry.tasks import settings as config
from modelferry.tasks.clients.bucket import Bucket
from modelferry.tasks.errors import Locked
from modelferry.tasks.records.lock import Lock
from tests import procs, standins
from tests.helpers import TINY, make_local_model, model_dir, start_stage, steps_by_name, wait_for_line


# --- 1. Ctrl-C and SIGTERM ---------------------------------------------------------------------

def stage_mid_upload(env, bucket, tmp_path, name: str, temporary_server: bool) -> subprocess.Popen:
    """A `stage` of a 5-file model into the slow bucket, returned once its first upload is under way;
    with `temporary_server`, on a temporary Prefect server of its own (no PREFECT_API_URL)."""
    model, _ = model_dir(tmp_path / "m")
    e = {**env, **bucket.env()}
    if temporary_server:
        e.pop("PREFECT_API_URL")
        e["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    proc = start_stage(e, str(model), "--name", name, "--allow-unloadable")
    try:
        wait_for_line(proc, "upload 1/5", timeout=240)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        raise
    return proc


@pytest.mark.parametrize("how,temporary_server", [
    ("ctrl-c", True),  # SIGINT to the whole process group, as a terminal sends it
    ("sigint-main", False),  # SIGINT to the main process alone
    ("sigterm", True),
    ("ctrl-c-twice", False),
])
def test_interrupted_stage_stops_at_once_and_leaves_nothing_running(env, slow_bucket, tmp_path, how, temporary_server):
    bucket, _, _ = slow_bucket
    proc = stage_mid_upload(env, bucket, tmp_path, "acme/interrupted", temporary_server)
    try:
        started = procs.tree(proc.pid)
        assert any("s5cmd" in p.cmdline for p in started), started
        assert not temporary_server or any("uvicorn" in p.cmdline for p in started), started
        t = time.monotonic()
        if how == "sigint-main":
            os.kill(proc.pid, signal.SIGINT)
        elif how == "sigterm":
            os.kill(proc.pid, signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
            if how == "ctrl-c-twice":
                time.sleep(0.3)
                os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - t
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == (143 if how == "sigterm" else 130), err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted", err[-3000:]
    assert err.count("interrupted") == 1 and "Traceback" not in err and "Error logging to API" not in err, err[-3000:]
    assert took < (5 if how == "ctrl-c-twice" else 20), (took, err[-2000:])
    time.sleep(0.5)
    left = procs.living(started)
    assert not left, (left, err[-3000:])
    s3 = Bucket(config.load(bucket.env()))
    assert s3.listing("manifests/acme/interrupted/") == {}, "an interrupted run published something"
    if how != "ctrl-c-twice":  # a forced exit can't release it; a re-run on this host takes it over at once
        assert s3.listing("locks/acme/interrupted/") == {}, "the lock was not released"


@pytest.mark.parametrize("temporary_server", [False, True])
def test_sigkilled_stage_leaves_no_uploader_behind(env, slow_bucket, tmp_path, temporary_server):
    """s5cmd and the temporary Prefect server run in sessions of their own (a terminal's Ctrl-C is
    ours to handle), so a SIGKILL of our process group doesn't reach them: the kernel kills them
    when their parent dies."""
    bucket, _, _ = slow_bucket
    proc = stage_mid_upload(env, bucket, tmp_path, "acme/killed-hard", temporary_server)
    try:
        started = procs.tree(proc.pid)
        assert any("s5cmd" in p.cmdline for p in started), started
        assert any("uvicorn" in p.cmdline for p in started) == temporary_server, started
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    time.sleep(1)
    left = procs.living(started)
    assert not left, left


# --- 2. a corrupt manifest ---------------------------------------------------------------------

def test_corrupt_manifest_is_named_everywhere_and_replace_rewrites_it(cli, s3, tmp_path):
    model = make_local_model(tmp_path / "m")
    assert cli("stage", str(model), "--name", "acme/corrupt").rc == 0
    assert cli("stage", str(model), "--name", "acme/intact").rc == 0
    rev = catalog.current_revision(s3, "acme/corrupt")
    key = layout.manifest_key("acme/corrupt", rev)
    s3.put_bytes(key, b'{"name": "acme/corrupt", "revision":')  # cut short, as a failed write leaves it

    listed = cli("list", "--json")
    assert listed.rc == 0, listed
    rows = {r["name"]: r for r in listed.json()}
    assert rows["acme/corrupt"]["verified"] == "CORRUPT manifest" and rows["acme/intact"]["verified"] == "ok"
    for args in (["verify", "acme/corrupt"], ["stage", str(model), "--name", "acme/corrupt"]):
        run = cli(*args)
        assert run.rc == 1 and key in run.err and "--replace" in run.err and "Traceback" not in run.err, run
    with pytest.raises(catalog.CorruptManifest):  # what `launch` asks for
        catalog.find_manifest(s3, "acme/corrupt", None)

    assert cli("stage", str(model), "--name", "acme/corrupt", "--replace").rc == 0
    assert cli("verify", "acme/corrupt").rc == 0


# --- 3. a missing current.json ------------------------------------------------------------------

def test_missing_current_pointer_is_not_taken_for_not_staged(cli, s3, tmp_path):
    model = make_local_model(tmp_path / "m")
    assert cli("stage", str(model), "--name", "acme/pointerless").rc == 0
    rev = catalog.current_revision(s3, "acme/pointerless")
    s3.delete([layout.current_key("acme/pointerless")])

    verify = cli("verify", "acme/pointerless")
    assert verify.rc == 1 and "no current revision" in verify.err and rev in verify.err, verify
    launch = cli("launch", "acme/pointerless", "--target", "sky", "--dry-run", extra_env={"VLLM_API_KEY": "k-123456"})
    assert launch.rc == 1 and "no current revision" in launch.err and "@main" not in launch.out, launch
    assert cli("verify", "acme/pointerless", "--revision", rev).rc == 0
    assert cli("stage", str(model), "--name", "acme/pointerless").rc == 0  # restores the pointer
    assert catalog.current_revision(s3, "acme/pointerless") == rev


# --- 4. refusals before Prefect starts and before any write --------------------------------------

def _quoted_name_dir(d: Path) -> Path:
    make_local_model(d)
    for i in range(10):
        (d / f"shard-{i}.safetensors").write_bytes(os.urandom(1000))
    (d / 'we"ird.safetensors').write_bytes(b"x")
    return d


@pytest.mark.parametrize("args,message", [
    (lambda t: [str(_quoted_name_dir(t / "q")), "--name", "acme/quoted"], "double quote"),
    (lambda t: [str(make_local_model(t / "m")), "--name", "a/b/c"], "is not a model name"),
    (lambda t: [str(make_local_model(t / "m")), "--name", "../x"], "is not a model name"),
    (lambda t: [str(make_local_model(t / "m")), "--name", "acme/" + "x" * 300], "is not a model name"),
    (lambda t: ["org/"], "neither an existing directory nor a Hub repo id"),
    (lambda t: ["acme/" + "x" * 300], "neither an existing directory nor a Hub repo id"),
    (lambda t: [str(t / "no-such-dir")], "no such directory"),
    (lambda t: ["./no-such-dir"], "no such directory"),
])
def test_bad_requests_are_refused_before_prefect_starts_and_before_any_write(cli, env, s3, tmp_path, args, message):
    home = tmp_path / "prefect-home"
    t = time.monotonic()
    run = cli("stage", *args(tmp_path), extra_env={"PREFECT_API_URL": "", "PREFECT_HOME": str(home)})
    took = time.monotonic() - t
    assert run.rc == 2 and message in run.err, run
    assert run.err.count("\n") == 1 and "Traceback" not in run.err and "Errno" not in run.err, run
    assert not (home / "prefect.db").exists(), "Prefect was started before the refusal"
    assert took < 10, took  # a temporary Prefect server alone takes 11-28 s here
    assert s3.listing("models/acme/quoted/") == {} and s3.listing("locks/") == {}


# --- 5. an object under a published prefix that the manifest doesn't name ------------------------

def test_stage_removes_objects_the_manifest_does_not_name(cli, s3, tmp_path):
    model = make_local_model(tmp_path / "m")
    assert cli("stage", str(model), "--name", "acme/stray").rc == 0
    rev = catalog.current_revision(s3, "acme/stray")
    s3.put_bytes(f"models/acme/stray/{rev}/extra.safetensors", b"not part of the model")
    manifest = catalog.read_manifest(s3, "acme/stray", rev)
    assert catalog.check_listing(s3, manifest).unexpected == ["extra.safetensors"]

    run = cli("stage", str(model), "--name", "acme/stray")
    assert run.rc == 0, run
    assert f"models/acme/stray/{rev}/extra.safetensors: not in the manifest" in run.err, run
    assert catalog.check_listing(s3, manifest).ok
    assert cli("verify", "acme/stray").rc == 0


# --- 6. time to error on a dead endpoint ---------------------------------------------------------

def test_dead_endpoint_and_wrong_scheme_fail_in_seconds(cli, bucket, tmp_path):
    model = make_local_model(tmp_path / "m")
    dead = f"http://127.0.0.1:{processes.free_port()}"
    wrong_scheme = bucket.endpoint.replace("http://", "https://")
    for endpoint, message in ((dead, "cannot connect to"), (wrong_scheme, "check the scheme")):
        t = time.monotonic()
        run = cli("stage", str(model), "--name", "acme/unreachable", extra_env={"R2_ENDPOINT": endpoint})
        took = time.monotonic() - t
        assert run.rc == 1 and message in run.err and run.err.count("\n") == 1, run
        assert took < 8, (endpoint, took)  # was 27-30 s: three clients each retrying


# --- 7. Prefect's temporary server --------------------------------------------------------------

def test_a_slow_temporary_prefect_server_is_one_line_saying_what_to_do(cli, tmp_path):
    model = make_local_model(tmp_path / "m")
    run = cli("stage", str(model), "--name", "acme/no-prefect",
              extra_env={"PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path / "ph"),
                         "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"})
    assert run.rc == 1 and "Traceback" not in run.err, run
    assert run.err.strip().splitlines()[-1].startswith("error: Prefect's temporary server did not answer within 1 s"), run
    assert "PREFECT_API_URL" in run.err and run.err.count("\n") == 1, run


# --- 8. the stale-lock takeover race ------------------------------------------------------------

RACER = """
import json, sys, time
from modelferry.tasks import settings
from modelferry.tasks.records import layout
from modelferry.tasks.clients.bucket import Bucket
from modelferry.tasks.errors import Locked
from modelferry.tasks.records.lock import Lock
s3 = Bucket(settings.load())
rounds = int(sys.argv[1])
print("ready", flush=True)
start = float(sys.stdin.readline())
for r in range(rounds):
    time.sleep(max(0.0, start + r * 1.5 - time.time()))
    lock = Lock(s3, "acme/raced", f"r{r}", ttl=3600)
    try:
        lock.acquire(wait=0)
        print(json.dumps({"round": r, "won": True, "t": time.time() - start - r * 1.5, "me": lock.owner["id"][:6],
                          "stored": s3.get_json(layout.lock_key("acme/raced", f"r{r}"))["id"][:6]}), flush=True)
    except Locked:
        print(json.dumps({"round": r, "won": False}), flush=True)
time.sleep(max(0.0, start + rounds * 1.5 - time.time()))  # a holder that exits is dead: stay until both are done
"""


class TakeoverDelay:
    """A loopback proxy in front of moto that holds back the writes a lock takeover is made of (a
    delete, or a write conditional on If-Match) by `delay` seconds: two waiters that both read the
    same stale lock then write in a known order, as they would on a slow link."""

    def __init__(self, upstream_port: int, delay: float):
        import http.client
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers botocore's `Expect: 100-continue` at once

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "DELETE" or "delete" in self.path.split("?", 1)[-1].split("&") \
                        or "If-Match" in self.headers:
                    time.sleep(delay)
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                conn.request(self.command, self.path, body,
                             {k: v for k, v in self.headers.items() if k.lower() != "expect"})
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_two_waiters_cannot_both_take_over_a_stale_lock(moto):
    """Before If-Match, takeover was read -> delete -> create: the later waiter's delete removed the
    lock the first had just created, and both went on as its holder."""
    s3 = Bucket(config.load(moto.env()))
    rounds = 4
    for r in range(rounds):  # a killed holder's lock, long past its ttl
        s3.put_bytes(layout.lock_key("acme/raced", f"r{r}"), json.dumps(
            {"id": "dead", "host": "elsewhere", "pid": 1, "since": 0}).encode(), "application/json")
    moto_port = int(moto.endpoint.rsplit(":", 1)[1])
    proxies = [TakeoverDelay(moto_port, 0.1), TakeoverDelay(moto_port, 0.5)]
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(rounds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, env={**os.environ, **moto.env(), "R2_ENDPOINT": f"http://127.0.0.1:{p.port}"})
              for p in proxies]
    assert [p.stdout.readline().strip() for p in racers] == ["ready", "ready"]
    start = time.time() + 0.5
    for p in racers:
        p.stdin.write(f"{start}\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=120)[0] for p in racers]
    assert [p.returncode for p in racers] == [0, 0], outs
    won = [[json.loads(line)["won"] for line in out.splitlines()] for out in outs]
    both = [r for r in range(rounds) if won[0][r] and won[1][r]]
    assert not both, (f"both processes took over the stale lock in rounds {both}", outs)
    assert all(won[0][r] or won[1][r] for r in range(rounds)), won


def test_a_heartbeat_never_overwrites_a_lock_someone_else_took(moto):
    s3 = Bucket(config.load(moto.env()))
    lock = Lock(s3, "acme/beaten", "r1", ttl=4)  # beats every second
    lock.acquire(wait=0)
    other = json.dumps({"id": "other", "host": "elsewhere", "pid": 1, "since": time.time()}).encode()
    s3.put_bytes(layout.lock_key("acme/beaten", "r1"), other, "application/json")  # taken over meanwhile
    assert lock.lost.wait(5), "the heartbeat did not notice"
    assert s3.get_bytes(layout.lock_key("acme/beaten", "r1")) == other
    with pytest.raises(Locked, match="nothing published"):
        lock.check()
    lock.release()  # not ours any more: left alone
    assert s3.get_bytes(layout.lock_key("acme/beaten", "r1")) == other


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    with standins.moto_bucket(tmp_path_factory.mktemp("moto-race"), "mf-race") as b:
        yield b


# --- 9. what the terminal shows -----------------------------------------------------------------

def test_the_terminal_shows_our_lines_and_one_error(cli, tmp_path):
    extra = {"PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path / "ph")}  # the temporary server's own lines too
    ok = cli("stage", TINY, "--name", "acme/quiet", extra_env=extra)
    assert ok.rc == 0, ok
    failed = cli("stage", TINY, "--name", "acme/quiet-failed", "--include", "*.gguf", extra_env=extra)
    assert failed.rc == 1, failed
    for run in (ok, failed):
        others = [line for line in run.err.splitlines() if line.strip() and " modelferry" not in line
                  and not line.startswith("error: ")]
        assert not others, others
        for noise in ("alembic", "Finished in state", "prefect.io", "Error logging to API", "Traceback"):
            assert noise not in run.err, (noise, run.err[-3000:])
    assert failed.err.count("matches include=['*.gguf']") == 1, failed.err


# --- issue 11: the user's Hugging Face cache ---------------------------------------------------

def test_a_file_in_the_hf_cache_is_not_downloaded_again_but_still_checked(cli, env, hub, s3):
    from huggingface_hub import hf_hub_download

    hub_cache = Path(env["HF_HOME"]) / "hub"
    kept = {name: Path(hf_hub_download(TINY, name, cache_dir=hub_cache, endpoint=hub, token=False))
            for name in ("model.safetensors", "config.json")}  # any HF tool put them there
    before = {p: p.stat().st_size for p in hub_cache.rglob("*") if p.is_file()}
    cached_bytes = sum(p.stat().st_size for p in kept.values())

    run = cli("stage", TINY, "--name", "acme/from-hf-cache", "--json")
    assert run.rc == 0, run
    by = steps_by_name(run.json())
    assert by["download"]["bytes"] == sum(p.stat().st_size for p in embedded.tiny_model_files().values()) - cached_bytes
    assert by["local_verify"]["files"] == 13
    assert all(p.exists() for p in before), "something was deleted from the user's HF cache"

    blob = kept["model.safetensors"].resolve()
    blob.write_bytes(os.urandom(blob.stat().st_size))  # bit rot in the cache: same size, other bytes
    bad = cli("stage", TINY, "--name", "acme/from-bad-hf-cache")
    assert bad.rc == 1 and "model.safetensors (sha256" in bad.err and "Hugging Face cache" in bad.err, bad
    rev = catalog.current_revision(s3, "acme/from-hf-cache")
    assert f"models/acme/from-bad-hf-cache/{rev}/model.safetensors" not in s3.listing("models/acme/from-bad-hf-cache/")
    assert s3.listing("manifests/acme/from-bad-hf-cache/") == {}
    assert blob.exists() and all(p.exists() for p in before), "the damaged file was deleted from the user's cache"


# --- model-refresh: each model on its own --------------------------------------------------------

def test_model_refresh_goes_through_the_whole_list_when_one_model_fails(env, s3, prefect_api, tmp_path, monkeypatch):
    from modelferry.flows.model_refresh import RefreshFailed, model_refresh

    for key in ("R2_ENDPOINT", "R2_BUCKET", "R2_ACCESS_KEY", "R2_SECRET_KEY", "HF_ENDPOINT", "MODELFERRY_CACHE",
                "HF_HOME", "MODELFERRY_RETRY_BASE_S"):
        monkeypatch.setenv(key, env[key])
    watch = tmp_path / "watch.yaml"
    watch.write_text(f"models:\n  - model: acme/not-on-the-hub\n  - model: {TINY}\n    keep: 1\n")
    with pytest.raises(RefreshFailed) as caught:
        model_refresh(str(watch))
    rows = {r["model"]: r for r in caught.value.rows}
    assert rows["acme/not-on-the-hub"]["status"] == "failed" and "not found" in rows["acme/not-on-the-hub"]["error"]
    assert rows[TINY]["status"] in ("staged", "unchanged"), rows
    assert "acme/not-on-the-hub" in str(caught.value)
