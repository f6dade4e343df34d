"""The generated SkyPilot task: SkyPilot's own schema, secrets only in `secrets`, clear option errors."""

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from modelferry.tasks.clients import processes, sky
from modelferry.tasks.launch import fit, options, skytask
from modelferry.tasks.errors import SettingsError
from modelferry.tasks.launch.options import LaunchOptions
from modelferry.tasks.settings import loader_env

ENDPOINT = "https://acct.r2.cloudflarestorage.com"
GB = 10**9


def build(**kw):
    opts = kw.pop("options", LaunchOptions())
    args = dict(model_uri="s3://models/models/acme/m/abc/", served_name="acme/m", model_bytes=16 * GB, weights="r2",
                options=opts, loader_env=loader_env(ENDPOINT))
    args.update(kw)
    return skytask.build_task_config(**args)


@pytest.mark.parametrize("mode", options.MODES)
@pytest.mark.parametrize("strategy", options.STRATEGIES)
def test_generated_task_passes_skypilots_schema(mode, strategy, sky_home):
    cfg = build(options=LaunchOptions(target="sky", mode=mode, strategy=strategy))
    task = sky.validate(cfg)
    assert task.envs["MODEL_URI"] == "s3://models/models/acme/m/abc/"
    # vLLM hands AWS_ENDPOINT_URL to the streamer; nothing reads RUNAI_STREAMER_S3_ENDPOINT.
    assert task.envs["AWS_ENDPOINT_URL"] == ENDPOINT and "RUNAI_STREAMER_S3_ENDPOINT" not in task.envs
    # VLLM_PORT is vLLM's own base for its internal ports, VLLM_HOST no vLLM variable at all.
    assert not {"VLLM_PORT", "VLLM_HOST"} & set(task.envs) and task.envs["SERVE_PORT"] == "8000"
    assert task.envs["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"] == "0"
    assert all(r.use_spot for r in task.resources)
    if mode == "serve":
        assert cfg["service"]["readiness_probe"]["path"] == "/health"
    if mode != "cluster":  # a managed job or a service replica must not stop itself when idle
        assert task.envs["IDLE_MINUTES"] == ""
    if mode == "job":
        # Preemption is recovered whatever this says; it counts only the job's own failures on a
        # cluster still UP (SkyPilot 0.14.1 sky/jobs/controller.py -> should_restart_on_failure in
        # sky/jobs/recovery_strategy.py). vLLM refusing its model fails alike on every node: no retry.
        assert cfg["resources"]["job_recovery"] == {"strategy": "EAGER_NEXT_REGION", "max_restarts_on_errors": 0}


@pytest.mark.parametrize("fallback", [False, True])
def test_a_spot_replica_still_starting_brings_an_on_demand_one_only_when_asked(fallback, sky_home):
    """The service as SkyServe's controller runs it: the spec from the task (sky.Task.service), its
    autoscaler made by `Autoscaler.from_spec` and asked for decisions over the replicas
    (sky/serve/controller.py 55-56, 69-107). A spot replica provisioning or starting makes it launch
    an on-demand one beside it only with dynamic_ondemand_fallback (serve/autoscalers.py 1049-1064).
    The probe waits as long as --ready-timeout."""
    from sky.serve import autoscalers, replica_managers
    from sky.utils.common_utils import ProcessStatus

    cfg = build(options=LaunchOptions(target="sky", mode="serve", ready_timeout=900, ondemand_fallback=fallback))
    spec = sky.validate(cfg).service
    assert spec.initial_delay_seconds == 900
    scaler = autoscalers.Autoscaler.from_spec("mf-svc", spec)
    for launch_status, status in ((ProcessStatus.RUNNING, "PROVISIONING"), (ProcessStatus.SUCCEEDED, "STARTING")):
        replica = replica_managers.ReplicaInfo(1, "mf-svc-1", "8000", True, None, 1, {"use_spot": True})
        replica.status_property.sky_launch_status = launch_status  # how the controller sees it start
        assert replica.status.value == status
        decisions = scaler.generate_scaling_decisions([replica], [])
        on_demand = [d for d in decisions if d.target == {"use_spot": False}]
        assert len(on_demand) == (1 if fallback else 0), decisions
        assert not [d for d in decisions if d.operator.name == "SCALE_UP" and d.target != {"use_spot": False}]


def test_a_services_row_says_spot_from_the_replicas_that_are_ready(sky_home):
    """`sky serve status` records as SkyServe's controller builds them (ReplicaInfo.to_info_dict,
    sky/serve/serve_utils.py 947-953) and the client decodes them (server/requests/serializers
    encoders.py 203-216, decoders.py 190-204)."""
    import copy

    from sky.serve import replica_managers, serve_state
    from sky.server.requests.serializers import decoders, encoders
    from sky.utils.common_utils import ProcessStatus

    from modelferry.tasks.clients import sky as ours

    def placed(*replicas: tuple[bool, bool]) -> dict:  # (spot, ready) each
        infos = []
        for n, (spot, ready) in enumerate(replicas, 1):
            info = replica_managers.ReplicaInfo(n, f"mf-svc-{n}", "8000", spot, None, 1, {"use_spot": spot})
            info.status_property.sky_launch_status = ProcessStatus.SUCCEEDED
            info.status_property.service_ready_now = ready
            infos.append(info.to_info_dict(with_handle=True, with_url=False, cluster_record=None))
        record = {"name": "mf-svc", "status": serve_state.ServiceStatus.READY, "replica_info": infos}
        (decoded,) = decoders.decode_serve_status(encoders.encode_serve_status([copy.deepcopy(record)]))
        return ours.replica_placement(decoded["replica_info"])

    assert placed((True, True)) == {"spot": True, "replicas": 1}
    assert placed((True, False), (False, True)) == {"spot": False, "replicas": 1}  # the on-demand fallback answers
    assert placed((True, True), (False, True)) == {"spot": None, "replicas": 2}  # either may have answered
    assert placed((True, False)) == {"spot": None, "replicas": 0}


def test_on_demand_fallback_is_for_spot_services_only():
    with pytest.raises(SettingsError, match="--ondemand-fallback is for --mode serve on spot"):
        LaunchOptions(target="sky", mode="cluster", ondemand_fallback=True).check()
    with pytest.raises(SettingsError, match="--ondemand-fallback"):
        LaunchOptions(target="sky", mode="serve", use_spot=False, ondemand_fallback=True).check()


AUTOSTOP = """
import json, time
from modelferry.tasks.clients import sky as ours
from modelferry.tasks.launch import skytask
from sky.skylet import autostop_lib, configs, events, job_lib

task = ours.validate(json.loads(CFG))
kw = ours.autostop()
for r in task.resources:  # the client SDK (sky/client/sdk.py 854-865)
    r.override_autostop_config(down=kw["down"], idle_minutes=kw["idle_minutes_to_autostop"], wait_for=kw.get("wait_for"))
config = next(iter(task.resources)).autostop_config  # the API server (sky/execution.py 464-498) ...
autostop_lib.set_autostop(idle_minutes=config.idle_minutes, backend="cloudvmray",  # ... the skylet (services.py 60-72)
                          wait_for=config.wait_for or autostop_lib.DEFAULT_AUTOSTOP_WAIT_FOR, down=config.down)
stored = autostop_lib.get_autostop_config()
event, downs = events.StopEvent(), []
event._stop_cluster = lambda c: downs.append(c.down)  # what a cloud would do; the decision is SkyPilot's
def idle_for(minutes):
    configs.set_config("autostop_last_active_time", str(time.time() - 60 * minutes))
    event._run()
    return list(downs)
job, _ = job_lib.add_job("modelferry-vllm", "user", "sky-1", "1x[L4:1]")
job_lib.set_job_started(job)
serving = idle_for(600)  # vLLM serving nobody for 10 hours: a running job is never idle to SkyPilot
job_lib.set_status(job, job_lib.JobStatus.SUCCEEDED)  # the node program stopped vLLM: no request for --idle-minutes
ended = idle_for(0.5), idle_for(stored.autostop_idle_minutes)
print(json.dumps({"minutes": stored.autostop_idle_minutes, "down": stored.down, "wait_for": stored.wait_for.value,
                  "serving": serving, "ended": ended}))
"""


def test_a_cluster_goes_down_a_minute_after_its_job_ends_as_skypilots_autostop_decides(tmp_path):
    """What `sky.launch` is given, read back through SkyPilot's own autostop code (sky/skylet/
    autostop_lib.py, events.py StopEvent 292-332): a job running keeps the cluster up however long
    vLLM serves nobody (so the node stops vLLM itself, IDLE_MINUTES); once it has ended, the cluster
    goes down (not stop) after AUTOSTOP_MINUTES."""
    cfg = build(options=LaunchOptions(target="sky", idle_minutes=20))
    assert cfg["envs"]["IDLE_MINUTES"] == "20"
    env = dict(os.environ, HOME=str(tmp_path), SKY_RUNTIME_DIR=str(tmp_path), CFG=json.dumps(cfg))
    out = subprocess.run([sys.executable, "-c", "import os; CFG = os.environ['CFG']\n" + AUTOSTOP], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    said = json.loads(out.stdout.strip().splitlines()[-1])
    assert said == {"minutes": 1, "down": True, "wait_for": "jobs_and_ssh", "serving": [], "ended": [[], [True]]}


def test_secrets_never_reach_envs_or_the_printed_yaml(sky_home):
    cfg = build()
    values = {"AWS_ACCESS_KEY_ID": "AKIAVERYSECRET1", "AWS_SECRET_ACCESS_KEY": "shh-secret-value-2", "VLLM_API_KEY": "api-key-3"}
    assert set(cfg["secrets"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "VLLM_API_KEY"}
    assert all(v is None for v in cfg["secrets"].values())
    assert not set(values) & set(cfg["envs"])
    shown = skytask.redacted_yaml(cfg, values)
    assert all(v not in shown for v in values.values())
    assert yaml.safe_load(shown)["secrets"]["AWS_SECRET_ACCESS_KEY"] == "<redacted>"
    task = sky.validate(cfg)
    task.update_secrets(values)
    assert all(v not in str(task.to_yaml_config(use_user_specified_yaml=True)) for v in values.values())


def test_hub_source_gets_the_hf_token_secret_and_no_bucket_keys_needed(sky_home):
    cfg = build(model_uri="acme/m", weights="hub", revision="abc")
    assert "HF_TOKEN" in cfg["secrets"] and cfg["envs"]["LOAD_STRATEGY"] == "hub" and cfg["envs"]["MODEL_REVISION"] == "abc"
    sky.validate(cfg)


# Meta's Llama-3.1-8B-Instruct config.json, as the Hub serves it (the fields the fit reads).
LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "max_position_embeddings": 131072, "rope_scaling": {"factor": 8.0, "rope_type": "llama3"},
            "torch_dtype": "bfloat16", "vocab_size": 128256}
LLAMA_8B_BYTES = 16_060_522_496  # its four safetensors shards


def test_the_gpus_fit_the_weights_and_the_kv_cache_of_the_full_context():
    """131,072 tokens x 128 KiB a token = 16 GiB of KV cache beside 15 GiB of weights: one 24 GB L4 or
    A10G holds the weights but not that, two do; an L40S, an A100 or an H100 holds it alone."""
    model = fit.Model.from_config(LLAMA_8B)
    assert model.full_context == 131072 and model.kv_bytes_per_token() == 128 * 1024
    fitted = skytask.fit_gpus(LLAMA_8B_BYTES, model)
    assert fitted.gpus == {"L4": 2, "A10G": 2, "L40S": 1, "A100": 1, "A100-80GB": 1, "H100": 1, "H200": 1}
    assert fitted.max_model_len == "" and fitted.note is None  # every option serves the model's own context
    at_8k = skytask.fit_gpus(LLAMA_8B_BYTES, model, context=8192)
    assert at_8k.gpus["L4"] == 1 and at_8k.max_model_len == "8192"


def test_an_option_too_small_for_the_full_context_serves_what_fits_and_says_so():
    model = fit.Model.from_config(LLAMA_8B)
    fitted = skytask.fit_gpus(LLAMA_8B_BYTES, model, {"L4": 1, "H100": 1})
    assert fitted.max_model_len == "-1" and fitted.gpus == {"L4": 1, "H100": 1}
    held = fit.context_on(model, LLAMA_8B_BYTES, "L4", 1)
    assert 16_000 < held < 40_000, held
    assert fitted.note.startswith(f"L4:1 holds about {held:,} tokens of the model's 131,072") and "--max-model-len" in fitted.note
    with pytest.raises(SettingsError, match="L4:1 holds about .* tokens, not a 65,536-token context.*--max-model-len"):
        skytask.fit_gpus(LLAMA_8B_BYTES, model, {"L4": 1}, context=65536)
    with pytest.raises(SettingsError, match="no GPU option holds .* choose a shorter --max-model-len"):
        skytask.fit_gpus(LLAMA_8B_BYTES, fit.Model.from_config({**LLAMA_8B, "max_position_embeddings": 10**8,
                                                               "rope_scaling": None}), context=5 * 10**7)
    with pytest.raises(SettingsError, match="T4:1 holds about 0 tokens"):
        skytask.fit_gpus(LLAMA_8B_BYTES, model, {"T4": 1})


def test_what_vllm_would_refuse_is_refused_before_launch():
    model = fit.Model.from_config(LLAMA_8B)
    with pytest.raises(SettingsError, match="more than the model's own context .131,072"):
        skytask.fit_gpus(LLAMA_8B_BYTES, model, context=200_000)
    qwen = fit.Model.from_config({**LLAMA_8B, "num_attention_heads": 28, "num_key_value_heads": 4})
    with pytest.raises(SettingsError, match="28 attention heads don't divide across"):
        skytask.fit_gpus(LLAMA_8B_BYTES, qwen, {"L4": 8})
    assert all(28 % n == 0 for n in skytask.fit_gpus(10 * LLAMA_8B_BYTES, qwen).gpus.values())


def test_configs_the_fit_cant_read_fall_back_to_the_weights_alone():
    gpt2 = {"n_layer": 48, "n_embd": 1600, "n_head": 25, "n_positions": 1024}
    assert fit.Model.from_config(gpt2) is None and fit.Model.from_config({"text_config": None, "x": 1}) is None
    assert fit.Model.from_config({**LLAMA_8B, "num_attention_heads": None}) is not None  # heads default to 1
    with pytest.raises(SettingsError, match="fit no GPU option"):
        skytask.fit_gpus(400 * 10**12, None)
    unstaged = skytask.fit_gpus(0, fit.Model.from_config(LLAMA_8B))  # a Hub model not staged: weights from config
    assert unstaged.gpus["L4"] == 2 and abs(fit.Model.from_config(LLAMA_8B).weight_bytes() - LLAMA_8B_BYTES) < 0.01 * LLAMA_8B_BYTES


def test_the_full_context_is_what_vllm_derives():
    gemma3 = {**LLAMA_8B, "model_type": "gemma3_text", "max_position_embeddings": 131072,
              "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    assert fit.Model.from_config(gemma3).full_context == 131072  # its 128K is already scaled
    phi3 = {**LLAMA_8B, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
            "rope_scaling": {"type": "longrope", "long_factor": [1.0], "short_factor": [1.0]}}
    assert fit.Model.from_config(phi3).full_context == 4096
    newer = {**LLAMA_8B, "max_position_embeddings": 4096, "rope_scaling": None,
             "rope_parameters": {"rope_type": "linear", "factor": 2.0}}
    assert fit.Model.from_config(newer).full_context == 8192


def test_the_fit_reads_kv_heads_tensor_parallel_mla_and_sliding_windows():
    model = fit.Model.from_config(LLAMA_8B)
    assert model.kv_bytes_per_token(2) == 64 * 1024 and model.kv_bytes_per_token(8) == 16 * 1024
    assert model.kv_bytes_per_token(16) == 16 * 1024  # fewer KV heads than GPUs: replicated, never below one
    deepseek = fit.Model.from_config({"num_hidden_layers": 61, "num_attention_heads": 128, "kv_lora_rank": 512,
                                      "qk_rope_head_dim": 64, "hidden_size": 7168, "max_position_embeddings": 163840,
                                      "torch_dtype": "bfloat16"})
    assert deepseek.kv_bytes_per_token(8) == 61 * 576 * 2 and "MLA" in deepseek.note()  # one latent, every GPU
    mistral = fit.Model.from_config({**LLAMA_8B, "sliding_window": 4096})
    assert mistral.kv_bytes_per_token() == model.kv_bytes_per_token() and "sliding" in mistral.note()
    linear = fit.Model.from_config({**LLAMA_8B, "max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert linear.full_context == 16384  # vLLM stretches linear scaling (config/model.py 2581-2610)


def test_the_local_node_fits_its_fixed_kv_cache_with_the_same_rule():
    model = fit.Model.from_config({**LLAMA_8B, "num_hidden_layers": 2, "num_key_value_heads": 4, "head_dim": 64,
                                   "max_position_embeddings": 1 << 20})  # 2 KiB a token: 1 GiB holds half of it
    fitted = skytask.fit_local(model, 2**30)
    assert fitted.max_model_len == "-1" and "holds about 524,160 tokens of the model's 1,048,576" in fitted.note
    assert skytask.fit_local(model, 2**30, context=4096).max_model_len == "4096"
    with pytest.raises(SettingsError, match="--max-model-len 1,048,576"):
        skytask.fit_local(model, 2**30, context=1 << 20)


@pytest.mark.parametrize("options,kw,message", [
    (LaunchOptions(mode="batch"), {}, "unknown --mode"),
    (LaunchOptions(concurrency=-1), {}, "--concurrency -1"),
    (LaunchOptions(concurrency=100000), {}, "--concurrency 100000"),
    (LaunchOptions(strategy="teleport"), {}, "unknown --strategy"),
    (LaunchOptions(), {"model_bytes": 2000 * GB}, "multi-node"),
    (LaunchOptions(accelerators=["TPU9"]), {}, "unknown accelerator 'TPU9'"),
    (LaunchOptions(accelerators=["T4:1"]), {}, "T4:1 cannot hold the weights"),
    (LaunchOptions(accelerators=["L4:3"]), {}, "accelerator count 3"),
    (LaunchOptions(memory_limit=-1), {}, "--memory-limit -1 .unbounded. is refused"),
    (LaunchOptions(memory_limit=8), {}, "--memory-limit 8 is in bytes"),
    (LaunchOptions(memory="lots"), {}, "--memory 'lots' is not a size"),
    (LaunchOptions(memory="64GB"), {}, "--memory '64GB' is not a size"),
    (LaunchOptions(memory="0+"), {}, "--memory '0.' is not a size"),
    (LaunchOptions(memory="-4"), {}, "--memory '-4' is not a size"),
])
def test_bad_options_are_clear_errors(options, kw, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        build(options=options, **kw)


def test_read_only_keys_go_to_nodes_when_set(monkeypatch):
    from modelferry.tasks import settings as config

    s = config.load({"R2_ENDPOINT": ENDPOINT, "R2_BUCKET": "models", "R2_ACCESS_KEY": "writekey1", "R2_SECRET_KEY": "writesecret1"})
    assert config.loader_secrets(s)["AWS_ACCESS_KEY_ID"] == "writekey1"
    monkeypatch.setenv("R2_READ_ACCESS_KEY", "readkey1")
    monkeypatch.setenv("R2_READ_SECRET_KEY", "readsecret1")
    assert config.loader_secrets(s) == {"AWS_ACCESS_KEY_ID": "readkey1", "AWS_SECRET_ACCESS_KEY": "readsecret1"}
    monkeypatch.delenv("R2_READ_SECRET_KEY")
    with pytest.raises(SettingsError, match="R2_READ_SECRET_KEY"):
        config.loader_secrets(s)


def test_names_are_deterministic_per_run():
    a = skytask.cluster_name("acme/Llama-3.1-8B", "abc", "run-1")
    assert a == skytask.cluster_name("acme/Llama-3.1-8B", "abc", "run-1") != skytask.cluster_name("acme/Llama-3.1-8B", "abc", "run-2")
    assert a.startswith("mf-llama-3-1-8b-") and len(a) <= 40


@pytest.mark.parametrize("part", ["setup", "run"])
def test_task_scripts_are_valid_bash(part):
    script = build()[part]
    assert subprocess.run(["bash", "-n", "-c", script], capture_output=True).returncode == 0


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck not installed (make test installs it)")
@pytest.mark.parametrize("compile_cache", [True, False])
@pytest.mark.parametrize("part", ["setup", "run"])
def test_task_scripts_are_shellcheck_clean(part, compile_cache, tmp_path):
    script = tmp_path / f"{part}.sh"
    script.write_text("#!/bin/bash\n" + build(options=LaunchOptions(compile_cache=compile_cache))[part])
    out = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


# The scripts' process handling, run with bash here. Fake `vllm`, `s5cmd` and `pip` stand in on PATH:
# what is under test is our scripts (when the job's output reaches EOF, its exit status, who gets a
# stop, which streamer gets installed), not vLLM; the real vLLM runs the same scripts in the
# real_vllm tier.
FAKE_VLLM = """#!/usr/bin/python3
import http.server, os, signal, sys, threading, time
if os.environ["FAKE_VLLM"] == "fail":
    sys.exit("fake vllm: refusing the model")
def stop(*_):
    print("fake vllm: stopped by SIGTERM", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
port = int(sys.argv[sys.argv.index("--port") + 1])
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", port), Health)
threading.Thread(target=server.serve_forever, daemon=True).start()
print("fake vllm: serving", flush=True)
time.sleep(float(os.environ["FAKE_VLLM_SERVE_S"]))
"""


def fake_bin(tmp_path, **scripts) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    for name, text in scripts.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


class Job:
    """A task script run the way SkyPilot's run_with_log runs it: its output read to EOF, and under
    `bash -i` (log_lib.run_bash_command_with_log; background children then lead process groups of
    their own) or plain `bash -c`."""

    def __init__(self, script: str, env: dict[str, str], shell: str, folder: Path):
        if shell == "bash -i":
            (folder / "job.sh").write_text(script)
            args = ["bash", "-i", str(folder / "job.sh")]
        else:
            args = ["bash", "-c", script]
        self.marker = f"MF_TEST_JOB={uuid.uuid4().hex}"
        env = {**env, "MF_TEST_JOB": self.marker.partition("=")[2]}
        self.started = time.monotonic()
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, text=True, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.eof_s: float | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.eof_s = time.monotonic() - self.started
        self.lines.put(None)

    def wait_for(self, text: str, timeout: float = 30) -> list[str]:
        seen = []
        deadline = time.monotonic() + timeout
        while (line := self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))) is not None:
            seen.append(line)
            if text in line:
                return seen
        raise AssertionError(f"{text!r} never came before EOF: {''.join(seen)}")

    def to_eof(self, timeout: float = 30) -> str:
        seen = []
        deadline = time.monotonic() + timeout
        try:
            while (line := self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))) is not None:
                seen.append(line)
        except queue.Empty:
            raise AssertionError(f"no EOF within {timeout} s: {''.join(seen)}") from None
        self.proc.wait(5)
        return "".join(seen)

    def survivors(self) -> list[int]:
        """Processes still running with this job's environment (its children and theirs)."""
        found = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            with contextlib.suppress(OSError):
                if self.marker.encode() in environ.read_bytes().split(b"\0"):
                    found.append(int(environ.parent.name))
        return found

    def kill(self):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture(params=["bash -i", "bash -c"])
def job(request, tmp_path):
    """Start the generated `run` script with a fake vLLM on PATH; everything it started is killed after."""
    from modelferry.tasks.on_node import node

    started = []
    artifact = tmp_path / ".cache" / "vllm" / "torch_compile_cache" / "model" / "artifact"  # something to save
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(b"compiled")
    # s5cmd: `ls` says whether the key is stored (FAKE_STORED), `cp` (the upload) takes FAKE_UPLOAD_S,
    # anything else (the restore's `cat`) FAKE_S5CMD_S
    bin_dir = fake_bin(tmp_path, vllm=FAKE_VLLM, s5cmd="""#!/bin/sh
case " $* " in
  *" ls "*) [ "${FAKE_STORED:-yes}" = yes ] ;;
  *" cp "*) exec sleep "${FAKE_UPLOAD_S:-0}" ;;
  *) exec sleep "${FAKE_S5CMD_S:-0}" ;;
esac
""")

    def start(fake_vllm: str, serve_s: float = 60, compile_cache_on: bool = True, **env) -> Job:
        cfg = build(options=LaunchOptions(compile_cache=compile_cache_on, ready_timeout=60), bucket="b")
        node_env = {k: str(v) for k, v in cfg["envs"].items()}
        node_env.update(PATH=f"{bin_dir}:/usr/bin:/bin", HOME=str(tmp_path), NODE_PROGRAM=node.__file__,
                        S5CMD=str(bin_dir / "s5cmd"), MF_GPU_NAME="cpu", SKYPILOT_NUM_GPUS_PER_NODE="1",
                        SERVE_HOST="127.0.0.1", SERVE_PORT=str(processes.free_port()), FAKE_VLLM=fake_vllm,
                        FAKE_VLLM_SERVE_S=str(serve_s), **env)
        started.append(Job(cfg["run"], node_env, request.param, tmp_path))
        return started[-1]

    yield start
    for j in started:
        j.kill()
        for pid in j.survivors():  # what it left in process groups of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_the_job_ends_within_seconds_of_vllm_failing_with_its_status(job):
    """The compile-cache saver, waiting for /health, must not hold the job's output open (the job
    then stays RUNNING until it gives up: an hour, before)."""
    run = job("fail")
    out = run.to_eof(timeout=20)
    assert run.eof_s < 5, out
    assert run.proc.returncode == 1 and "fake vllm: refusing the model" in out
    assert run.survivors() == []  # (the saver may die before it can say so: vLLM fails here at once)


def test_a_save_in_flight_when_vllm_exits_is_stopped_with_its_upload(job):
    run = job("serve", serve_s=2, FAKE_STORED="no", FAKE_UPLOAD_S="60")
    out = run.to_eof(timeout=20)
    assert run.eof_s < 8 and "not saved: the job ended first" in out, out
    assert run.survivors() == []  # no s5cmd left uploading


def test_the_savers_outcome_reaches_the_log_when_vllm_serves(job):
    run = job("serve", serve_s=3)
    out = run.to_eof(timeout=30)
    # the fake s5cmd says every key is stored already
    assert "modelferry compile cache: already stored" in out and "fake vllm: serving" in out, out
    assert run.proc.returncode == 0 and run.eof_s < 10 and run.survivors() == []


def test_a_stop_reaches_vllm_and_ends_the_job(job):
    """SIGTERM to the script alone (SkyPilot's cancel, our local stop) is passed on to vLLM."""
    run = job("serve")
    run.wait_for("modelferry compile cache: already stored")
    os.kill(run.proc.pid, signal.SIGTERM)
    stopped = time.monotonic()
    out = run.to_eof(timeout=10)
    assert "fake vllm: stopped by SIGTERM" in out and time.monotonic() - stopped < 5, out
    assert run.survivors() == []


def test_a_stop_before_vllm_starts_never_starts_it(job):
    run = job("serve", FAKE_S5CMD_S="2")  # the restore takes 2 s
    run.wait_for("modelferry mark run-start")
    time.sleep(0.5)  # past the traps, inside the restore
    os.kill(run.proc.pid, signal.SIGTERM)
    out = run.to_eof(timeout=15)
    assert run.proc.returncode == 143 and "fake vllm" not in out, out


def test_without_the_compile_cache_the_job_still_ends_with_vllm(job):
    run = job("fail", compile_cache_on=False)
    out = run.to_eof(timeout=20)
    assert run.proc.returncode == 1 and run.eof_s < 5 and "compile cache: off" in out, out


def dist_info(folder: Path, name: str, version: str) -> None:
    meta = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


@pytest.mark.parametrize("strategy,installed,pip_runs", [
    ("stream", {"runai-model-streamer": "0.17.0", "runai-model-streamer-s3": "0.17.0"}, False),
    ("stream", {"runai-model-streamer": "0.15.7", "runai-model-streamer-s3": "0.15.7"}, True),  # the image's own
    ("stream", {"runai-model-streamer": "0.17.0"}, True),  # no S3 backend
    ("prefetch", {"runai-model-streamer": "0.15.7"}, False),  # not used: only reported
])
def test_setup_installs_the_pinned_streamer_unless_both_packages_match(strategy, installed, pip_runs, tmp_path):
    site = tmp_path / "site"
    for name, version in installed.items():
        dist_info(site, name, version)
    # `python3 -m pip` finds this pip first: it logs what it was asked to install
    (site / "pip").mkdir(parents=True)
    (site / "pip" / "__init__.py").write_text("")
    (site / "pip" / "__main__.py").write_text("import os, sys\nopen(os.environ['PIP_LOG'], 'a').write(' '.join(sys.argv))\n")
    bin_dir = fake_bin(tmp_path, s5cmd="#!/bin/sh\n")
    cfg = build(options=LaunchOptions(strategy=strategy))
    env = {k: str(v) for k, v in cfg["envs"].items()}
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", HOME=str(tmp_path), PYTHONPATH=str(site), PIP_LOG=str(tmp_path / "pip.log"),
               PREFETCH_DIR=str(tmp_path / "model"), NODE_PROGRAM=skytask.packaged_file("tasks/on_node/node.py"))
    out = subprocess.run(["bash", "-c", cfg["setup"]], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pip = (tmp_path / "pip.log").read_text() if (tmp_path / "pip.log").exists() else ""
    assert ("runai-model-streamer[s3]==0.17.0" in pip) is pip_runs, pip
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("modelferry streamer ")]
    assert lines == ["modelferry streamer runai-model-streamer={} runai-model-streamer-s3={}".format(
        installed.get("runai-model-streamer", "none"), installed.get("runai-model-streamer-s3", "none"))]


# Host memory: what each GPU option asks SkyPilot for, and the streamer buffer the `run` script sizes
# from the node it lands on.
GIB = 2**30


def asks(cfg: dict) -> dict[str, float]:
    """{"L4:1": 12.0, ...}: each any_of option's `memory`, in GiB, all of them "at least"."""
    out = {}
    for option in cfg["resources"]["any_of"]:
        (gpu, n), = option["accelerators"].items()
        assert option["memory"].endswith("+"), option
        out[f"{gpu}:{n}"] = float(option["memory"][:-1])
    return out


def test_each_gpu_option_asks_for_host_memory_growing_with_its_gpus(sky_home):
    cfg = build(model_bytes=16 * GB, options=LaunchOptions(target="sky", accelerators=["L4:1,L40S:2,A100:4,H100:8"]))
    memory = asks(cfg)
    assert list(memory) == ["L4:1", "L40S:2", "A100:4", "H100:8"]
    assert memory["L4:1"] < memory["L40S:2"] < memory["A100:4"] < memory["H100:8"], memory
    task = sky.validate(cfg)  # SkyPilot's own schema and Resources accept the syntax
    assert {r.memory for r in task.resources} == {f"{g:g}+" for g in memory.values()}


@pytest.mark.parametrize("model_bytes", [0, 34 * 10**6, 2 * GB, 16 * GB])  # 0: a Hub model without manifest
def test_a_small_model_on_one_l4_fits_a_16_gib_host(model_bytes):
    """g6.xlarge and GCP's g2-standard-4, the cheapest L4 hosts, have 16 GiB."""
    memory = asks(build(model_bytes=model_bytes, options=LaunchOptions(accelerators=["L4:1"])))
    assert 8 <= memory["L4:1"] <= 16, memory


def test_the_memory_option_overrides_every_gpu_options_ask(sky_home):
    for spec in ("64+", "48"):
        cfg = build(model_bytes=140 * GB, options=LaunchOptions(target="sky", memory=spec))
        assert len(cfg["resources"]["any_of"]) > 1
        assert {o["memory"] for o in cfg["resources"]["any_of"]} == {spec}
        assert {r.memory for r in sky.validate(cfg).resources} == {spec}


def test_skypilots_schema_checks_the_memory_we_write(sky_home):
    """validate() is the check that would catch a syntax SkyPilot does not take."""
    cfg = build()
    cfg["resources"]["any_of"][0]["memory"] = "lots"
    with pytest.raises(SettingsError, match="SkyPilot rejected"):
        sky.validate(cfg)


@pytest.mark.parametrize("opts", [LaunchOptions(), LaunchOptions(strategy="prefetch"), LaunchOptions(memory_limit=0),
                                  LaunchOptions(memory_limit=8 * GIB)])
def test_no_unbounded_buffer_ever_reaches_the_task(opts):
    cfg = build(options=opts)
    assert cfg["envs"]["LOADER_MEMORY_LIMIT"] == ("auto" if opts.memory_limit is None else str(opts.memory_limit))
    assert cfg["envs"]["LOADER_MEMORY_LIMIT"] != "-1"
    with pytest.raises(SettingsError, match="--memory-limit -1"):
        build(options=LaunchOptions(memory_limit=-1))


def test_the_dry_runs_yaml_shows_each_options_memory():
    """`launch --dry-run` prints redacted_yaml of the task (flows/commands.py launch)."""
    cfg = build(options=LaunchOptions(accelerators=["L4:1,H100:8"]))
    shown = yaml.safe_load(skytask.redacted_yaml(cfg))
    assert shown["resources"]["any_of"] == [{"accelerators": {"L4": 1}, "memory": "16+"},
                                            {"accelerators": {"H100": 8}, "memory": "37+"}]


def test_the_dry_run_shows_the_command_the_node_will_run():
    line = skytask.node_command(build(options=LaunchOptions(max_model_len=8192, extra_vllm_args="--enforce-eager")))
    assert line == ("vllm serve s3://models/models/acme/m/abc/ --load-format runai_streamer --model-loader-extra-config "
                    "'<sized on the node>' --served-model-name acme/m --tensor-parallel-size <GPUs of the node> "
                    "--host 0.0.0.0 --port 8000 --max-model-len 8192 --enforce-eager")
