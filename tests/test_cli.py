import subprocess
import sys

import pytest


@pytest.mark.parametrize("command", ["check-r2", "stage", "verify", "list", "refresh", "deploy", "gc", "cost"])
def test_every_command_has_help_with_an_example_or_description(command):
    out = subprocess.run([sys.executable, "-m", "modelferry.flows", command, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "usage: modelferry " + command in out.stdout
    assert len(out.stdout.splitlines()) > 5


def test_top_level_help_lists_settings():
    out = subprocess.run([sys.executable, "-m", "modelferry.flows", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "R2_ENDPOINT" in out.stdout and "HF_TOKEN" in out.stdout


def test_blocks_carry_the_settings_for_processes_without_them(cli, env):
    from tests.helpers import ACCESS_KEY, SECRET_KEY

    saved = cli("blocks")
    assert saved.rc == 0 and "modelferry-r2-secret-key" in saved.out, saved
    assert SECRET_KEY not in saved.out + saved.err
    bare = {k: "" for k in ("R2_ENDPOINT", "R2_BUCKET", "R2_ACCESS_KEY", "R2_SECRET_KEY")}
    listed = cli("list", "--json", extra_env=bare)
    assert listed.rc == 0, listed
    assert isinstance(listed.json(), list)
    assert SECRET_KEY not in listed.out + listed.err and ACCESS_KEY not in listed.out + listed.err
    no_api = cli("list", extra_env={**bare, "PREFECT_API_URL": ""})
    assert no_api.rc == 2 and "R2_ENDPOINT is not set" in no_api.err


BAD_LAUNCHES = [
    ({"mode": "batch"}, "--mode"), ({"strategy": "teleport"}, "--strategy"), ({"concurrency": 0}, "--concurrency"),
    ({"memory_limit": -5}, "--memory-limit"), ({"headroom": 0.5}, "--headroom"),
    ({"ready_timeout": 0}, "--ready-timeout"), ({"idle_minutes": 0}, "--idle-minutes"),
    ({"disk_size": 1}, "--disk-size"), ({"accelerators": ["TPU9"]}, "accelerator"),
    ({"target": "moon"}, "--target"), ({"source": "ftp"}, "--source"), ({"target": "local", "mode": "serve"}, "--mode"),
]


@pytest.mark.parametrize("bad,flag", BAD_LAUNCHES)
def test_each_launch_option_is_checked_once_and_its_error_names_a_real_flag(bad, flag):
    """One check per option (sky.check_launch, used by the CLI before Prefect starts and by the flow and
    the planner), and the flag it names is one `launch --help` offers."""
    from modelferry.tasks.errors import SettingsError
    from modelferry.tasks.sky import check_launch, launch_options

    where = {"target": bad.get("target", "sky"), "source": bad.get("source", "auto")}
    with pytest.raises(SettingsError) as err:
        check_launch(where["target"], where["source"], launch_options(**bad))
    assert flag in str(err.value)
    named = [w.strip("'\",:") for w in str(err.value).split() if w.startswith("--")]
    helps = subprocess.run([sys.executable, "-m", "modelferry.flows", "launch", "--help"], capture_output=True,
                           text=True, timeout=60).stdout
    assert named and all(n in helps for n in named), (named, str(err.value))
