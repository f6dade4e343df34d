"""Launch, poll and teardown against SkyPilot's real local API server, driven all the way to a real
provisioning failure offline; teardown must run and leave no cluster in SkyPilot's state."""

import json

import pytest

from tests import sky_offline
from tests.helpers import TINY


@pytest.fixture(scope="module")
def sky_env(tmp_path_factory):
    env = sky_offline.plant(tmp_path_factory.mktemp("sky-offline"))
    sky_offline.start(env)
    try:
        yield env
    finally:
        sky_offline.stop(env)


def test_launch_fails_in_provisioning_and_tears_down(cli, sky_env):
    assert cli("stage", TINY).rc == 0
    env = {k: sky_env[k] for k in ("HOME", "SKYPILOT_API_SERVER_LOCAL_PORT", "SKYPILOT_DISABLE_USAGE_COLLECTION",
                                   "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "PATH")}
    run = cli("launch", TINY, "--target", "sky", "--accelerators", "L4:1", "--source", "r2", "--json",
              extra_env={**env, "VLLM_API_KEY": "mf-api-key-offline-1"}, timeout=600)
    assert run.rc == 1, run
    assert "SkyPilot could not launch" in run.err and "ResourcesUnavailableError" in run.err, run
    assert "mf-api-key-offline-1" not in run.out + run.err
    assert json.loads(run.out) == []  # no phase rows; SkyPilot's own output went to stderr
    assert "nothing to take down" in run.err  # teardown ran after the failure
    assert sky_offline.run(sky_env, "import sky; print(sky.get(sky.status()))").strip() == "[]"
