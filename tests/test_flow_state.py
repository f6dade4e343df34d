"""The stage-and-launch flow holds each deployment as a value: a launch that fails after its node
started is still torn down, and two runs in one process don't see each other's nodes."""

from __future__ import annotations

import pytest

from modelferry.tasks.launch import targets
from modelferry.tasks.errors import StepFailed


class NodeThatDies:
    """A target whose node starts, then its job fails before serving (vLLM refused the model)."""

    name, poll_s, serves_hub, peak_wait_s = "sky", 0.05, True, 0.0
    kv_cache_bytes = None  # a GPU's: fitted to the weights

    def __init__(self):
        self.started: list[str] = []
        self.torn_down: list[str] = []

    def api_key(self) -> str:
        return "test-key-not-secret"

    def handle(self, dep) -> Dying:
        return Dying(self, dep.cluster)

    def down(self, what, everything) -> list[str]:
        return []


class Dying:
    def __init__(self, target: NodeThatDies, cluster: str):
        self.target, self.cluster = target, cluster

    def start(self) -> None:
        self.target.started.append(self.cluster)

    def state(self) -> str:
        return "FAILED"

    def log(self) -> str:
        return "ERROR 12-02 10:00:00 [api_server.py:1] ValueError: this model is refused\n"

    def endpoint(self) -> str:
        return "http://127.0.0.1:9"  # nothing listens: /health never answers

    def where(self) -> dict:
        return {}

    def restart(self) -> None:
        raise AssertionError("no warm run after a failed launch")

    def stop(self) -> None:
        self.target.torn_down.append(self.cluster)


@pytest.fixture
def flow_env(env, prefect_api, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    for key in ("R2_ENDPOINT", "R2_BUCKET", "R2_ACCESS_KEY", "R2_SECRET_KEY", "HF_ENDPOINT", "MODELFERRY_CACHE",
                "HF_HOME", "MODELFERRY_RETRY_BASE_S"):
        monkeypatch.setenv(key, env[key])
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        yield


def test_a_launch_that_fails_after_its_node_started_is_torn_down_and_runs_share_nothing(flow_env, monkeypatch):
    from modelferry.flows.stage_and_launch import stage_and_launch

    fake = NodeThatDies()
    monkeypatch.setitem(targets.TARGETS, "sky", fake)
    names = []
    for _ in range(2):  # two runs in one process, as a worker running flows in-process does
        with pytest.raises(StepFailed) as err:
            stage_and_launch("acme/not-staged", stage=False, target="sky", source="hub", accelerators=["L4:1"])
        assert "this model is refused" in str(err.value) and "FAILED" in str(err.value)
        assert err.value.rows[-1]["step"] == "launch" and err.value.rows[-1]["attempts"] == 1  # it would fail again
        names.append(fake.started[-1])
    assert fake.started == names and names[0] != names[1]  # one node per run, named after its flow run
    assert fake.torn_down == names, "each run tears down its own node, exactly once"
