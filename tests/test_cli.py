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
    from tests.conftest import ACCESS_KEY, SECRET_KEY

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
def test_each_bad_launch_option_gets_one_message_from_cli_flow_and_builder_naming_a_real_flag(bad, flag, capsys):
    """LaunchOptions.check is the one check: the CLI (before Prefect starts), the flow (before staging)
    and the task builder refuse a bad option with the same message, and the flag it names is one
    `launch --help` offers."""
    from modelferry.flows import cli
    from modelferry.flows.stage_and_launch import stage_and_launch
    from modelferry.tasks import skytask
    from modelferry.tasks.errors import SettingsError
    from modelferry.tasks.options import LaunchOptions

    bad = {"target": "sky", **bad}
    with pytest.raises(SettingsError) as err:
        LaunchOptions(**bad).check()
    message = str(err.value)
    assert flag in message
    with pytest.raises(SettingsError) as from_flow:
        stage_and_launch.fn("acme/m", stage=False, **bad)
    assert str(from_flow.value) == message
    with pytest.raises(SettingsError) as from_builder:
        skytask.build_task_config(model_uri="s3://b/models/acme/m/abc/", served_name="acme/m", model_bytes=10**9,
                                  weights="r2", options=LaunchOptions(**bad), loader_env={})
    assert str(from_builder.value) == message
    flags = []
    for key, value in bad.items():
        option = "--" + key.replace("_", "-")
        flags += [option, *value] if isinstance(value, list) else [option, str(value)]
    assert cli.main(["launch", "acme/m", *flags]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    named = [w.strip("'\",:") for w in message.split() if w.startswith("--")]
    helps = subprocess.run([sys.executable, "-m", "modelferry.flows", "launch", "--help"], capture_output=True,
                           text=True, timeout=60).stdout
    assert named and all(n in helps for n in named), (named, message)


def test_flow_parameters_cli_flags_and_launch_options_are_one_set_of_names():
    """Each LaunchOptions field is a stage-and-launch parameter with the same default, and a flag of
    `launch`, `bench` and `stage-and-launch` whose parsed value lands under the field's name."""
    import dataclasses
    import inspect

    from modelferry.flows import cli
    from modelferry.flows.stage_and_launch import stage_and_launch
    from modelferry.tasks.options import LaunchOptions

    fields = {f.name: f.default for f in dataclasses.fields(LaunchOptions)}
    params = inspect.signature(stage_and_launch.fn).parameters
    assert {k: params[k].default for k in fields if k in params} == fields
    parser = cli.parser()
    for command in ("launch", "bench", "stage-and-launch"):
        parsed = vars(parser.parse_args([command, "acme/m"]))
        assert {k: parsed[k] for k in fields if k in parsed} == fields, command
    flipped = vars(parser.parse_args(["launch", "acme/m", "--on-demand", "--no-compile-cache", "--vllm-image", "img",
                                      "--extra-vllm-args=--max-model-len 512", "--accelerators", "L4:1"]))
    assert LaunchOptions.pick(flipped) == LaunchOptions(use_spot=False, compile_cache=False, vllm_image="img",
                                                        extra_vllm_args="--max-model-len 512", accelerators=["L4:1"])
