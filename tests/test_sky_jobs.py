"""The sky path's job log, readiness watch and warm restart, at the SkyPilot SDK boundary.

Simulated there (no cloud here): the SDK calls that need a cluster (`launch`, `exec`, `cancel`,
`job_status`, `tail_logs`, `endpoints`, `stream_and_get`, `get`) answer the way SkyPilot 0.14.1's
client does (a job id from launch/exec, `JobStatus` values, the job's log written to
`output_stream`), and the log they hand back is one captured from a real vLLM 0.32 run on the local
target, in the form a SkyPilot node's run.log holds it: the Ray driver's, every line under Ray's
colour-coded `(setup pid=N) ` / `(modelferry-vllm, pid=N) ` prefix (tests/fixtures/vllm-0.32-ray,
from tests/fixtures/ray_form.py, which names the SkyPilot and Ray source of the form). Real: the
task, built from the template and validated by SkyPilot's own schema; the calls we make and their
arguments; the parsing and the measurement of the log.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from modelferry.tasks.launch import launcher, targets
from modelferry.tasks.measure import results, startlog
from modelferry.tasks.clients import sky as mf_sky
from modelferry.tasks.launch import skytask
from modelferry.tasks.errors import SettingsError
from modelferry.tasks.launch.options import LaunchOptions
from modelferry.tasks.settings import loader_env

FIXTURES = Path(__file__).parent / "fixtures" / "vllm-0.32-ray"


class FakeSky:
    """SkyPilot's client module, minus the cloud."""

    def __init__(self, real, logs: dict[int, str], states: dict[int, str]):
        self.Task, self.real = real.Task, real
        self.logs, self.states, self.calls = logs, states, []
        self.task_names: list[str | None] = []

    def launch(self, task, cluster_name, **kwargs):
        self.calls.append(("launch", cluster_name))
        self.task_names.append(task.name)  # the Ray prefix of the run's lines is "(<task name>, pid=N) "
        return ("launched", 1)

    def exec(self, task, cluster_name):
        self.calls.append(("exec", cluster_name, task.setup, task.run))
        return ("launched", max(self.logs))

    def stream_and_get(self, request, output_stream=None):
        return request[1], object()  # (job_id, handle)

    def get(self, value):
        return value

    def cancel(self, cluster_name, job_ids):
        self.calls.append(("cancel", cluster_name, job_ids))
        self.states[job_ids[0]] = "CANCELLED"

    def job_status(self, cluster_name, job_ids):
        from sky.skylet.job_lib import JobStatus

        return {j: JobStatus(self.states[j]) for j in job_ids}

    def tail_logs(self, cluster_name, job_id, follow, output_stream=None, tail=0):
        """The job's run.log as a node holds it: the Ray driver's output (the logs given are in that form)."""
        self.calls.append(("tail_logs", job_id, follow))
        output_stream.write(self.logs[job_id])
        return 0

    def endpoints(self, cluster_name, port):
        return {}  # no port open yet

    def status(self, cluster_names):
        """`sky status` of the cluster as SkyPilot 0.14.1 answers it: a StatusResponse
        (sky/schemas/api/responses.py) whose handle is a CloudVmRayResourceHandle holding the
        launched Resources (backends/cloud_vm_ray_backend.py), here an L4 spot g6.xlarge in us-east-1."""
        import sky
        from sky.backends.cloud_vm_ray_backend import CloudVmRayResourceHandle
        from sky.schemas.api.responses import StatusResponse
        from sky.utils import status_lib

        launched = sky.Resources(infra="aws/us-east-1", instance_type="g6.xlarge", accelerators={"L4": 1}, use_spot=True)
        handle = CloudVmRayResourceHandle(cluster_name=cluster_names[0], cluster_name_on_cloud=f"{cluster_names[0]}-2ea4",
                                          cluster_yaml=None, launched_nodes=1, launched_resources=launched)
        return [StatusResponse(name=cluster_names[0], launched_at=0, handle=handle, status=status_lib.ClusterStatus.UP,
                               autostop=30, to_down=True, cluster_hash="h", cluster_ever_up=True, user_hash="u",
                               user_name="n", workspace="default", is_managed=False, nodes=1)]


@pytest.fixture
def fake(sky_home, monkeypatch):
    real = mf_sky._sky()
    box = {}

    def make(logs: dict[int, str], states: dict[int, str]) -> FakeSky:
        box["fake"] = FakeSky(real, logs, states)
        monkeypatch.setattr(mf_sky, "_sky", lambda: box["fake"])
        return box["fake"]

    return make


def deployment(mode: str = "cluster") -> launcher.Deployment:
    options = LaunchOptions(target="sky", mode=mode, accelerators=["L4:1"])
    cfg = skytask.build_task_config(model_uri="s3://b/models/modelferry/tiny-llama/abc/", served_name="modelferry/tiny-llama",
                                   model_bytes=34 * 10**6, weights="r2", options=options, revision="abc", bucket="b",
                                   loader_env=loader_env("https://acct.r2.cloudflarestorage.com"))
    secrets = {"AWS_ACCESS_KEY_ID": "k-7", "AWS_SECRET_ACCESS_KEY": "s-7", "VLLM_API_KEY": "a-7"}
    return launcher.Deployment("mf-tiny-llama-0000", "modelferry/tiny-llama", "abc", "r2", options, cfg, secrets)


def test_the_job_log_is_fetched_once_and_measured_like_the_local_one(fake):
    sky = fake({1: (FIXTURES / "stream-cold.log").read_text()}, {1: "RUNNING"})
    dep = deployment()
    launcher.start(dep)
    assert dep.handle.job_id == 1 and dep.url is None
    logged_exec = float(next(x for x in dep.handle.log().splitlines() if "mark exec" in x).split()[-1])
    dep.marks = {"request": logged_exec - 30, "ready": logged_exec + 300, "first_token": logged_exec + 301}
    row = launcher.measure(dep, "cold", 1).record()
    assert ("tail_logs", 1, False) in sky.calls  # never follows: it would block until the job ends
    assert sky.task_names == ["modelferry-vllm"]  # the name in the fixture's run prefix
    assert "\x1b[36m(setup pid=" in dep.handle.log() and "\x1b[36m(modelferry-vllm, pid=" in dep.handle.log()
    assert row["target"] == "sky" and row["strategy"] == "stream" and row["weights_s"] is not None
    assert row["setup_s"] > 0 and row["boot_s"] > 0 and row["engine_s"] > 0 and row["first_token_s"] == 1.0
    assert row["provision_s"] > 0 and row["compile_cache"] == "miss" and row["compile_s"] > 0
    assert {k: row[k] for k in results.PLACEMENT} == {"gpu": "L4", "gpus": 1, "instance_type": "g6.xlarge",
                                                       "cloud": "aws", "region": "us-east-1", "spot": True}
    assert abs(sum(row[k] for k in startlog.PHASES) - row["total_s"]) < 0.01


def test_a_failed_job_ends_the_wait_at_once_with_vllms_own_error(fake):
    fake({1: (FIXTURES / "failed-no-config.log").read_text()}, {1: "FAILED"})
    dep = deployment()
    launcher.start(dep)
    t0 = time.monotonic()
    with pytest.raises(launcher.NotReady) as err:
        launcher.wait_ready(dep, timeout=1800)
    assert time.monotonic() - t0 < 5
    assert "FAILED" in str(err.value) and "Invalid repository ID or local directory" in str(err.value)
    assert "pydantic_core._pydantic_core.ValidationError" in str(err.value) and "\x1b" not in str(err.value)


def test_a_warm_run_cancels_the_serving_job_then_runs_the_tasks_run_again(fake):
    sky = fake({1: (FIXTURES / "stream-cold.log").read_text(), 2: (FIXTURES / "stream-warm.log").read_text()},
               {1: "RUNNING", 2: "RUNNING"})
    dep = deployment()
    launcher.start(dep)
    launcher.restart(dep)
    cancel = sky.calls.index(("cancel", dep.cluster, [1]))
    exec_call = next(c for c in sky.calls if c[0] == "exec")
    assert sky.calls.index(exec_call) > cancel  # the GPUs are free before the new job asks for them
    assert exec_call[1] == dep.cluster and exec_call[3] == dep.cfg["run"]
    assert dep.handle.job_id == 2 and "modelferry mark run-start" in dep.handle.log()


def test_warm_runs_need_a_cluster_job(fake):
    fake({1: ""}, {1: "RUNNING"})
    dep = deployment(mode="serve")
    dep.handle = targets.TARGETS["sky"].handle(dep)  # a service: SkyServe's replicas, no job of ours
    with pytest.raises(SettingsError, match="--runs 1"):
        launcher.restart(dep)
