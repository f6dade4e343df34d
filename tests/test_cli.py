import re
import subprocess
import sys

import pytest


# Every command `modelferry --help` lists, with the flags its --help must name: written out here, not
# read from the parser, so a flag that goes missing from the help (or one added without a row) fails.
LAUNCH = ["--revision", "--target", "--mode", "--source", "--strategy", "--accelerators", "--concurrency",
          "--no-compile-cache", "--vllm-image", "--ready-timeout", "--max-model-len", "--memory-limit", "--memory",
          "--idle-minutes",
          "--on-demand", "--ondemand-fallback", "--disk-size", "--extra-vllm-args", "--json"]
FLAGS = {
    "check-r2": ["--json"],
    "stage": ["--revision", "--include", "--exclude", "--name", "--allow-unloadable", "--replace", "--no-set-current",
              "--task-runner", "--dask-address", "--json"],
    "verify": ["--revision", "--deep", "--json"],
    "list": ["--json", "--compile-caches"],
    "launch": [*LAUNCH, "--keep", "--dry-run"],
    "bench": [*LAUNCH, "--runs", "--results"],
    "stage-and-launch": [*LAUNCH, "--name", "--runs", "--include", "--exclude", "--keep", "--results"],
    "down": ["--all", "--target"],
    "cost": ["--revision", "--launches-per-day", "--s3-egress-per-gb", "--r2-storage-per-gb-month",
             "--r2-class-b-per-million", "--read-request-mib", "--gpu-price", "--hub-mb-s", "--json"],
    "gc": ["--grace-hours", "--dry-run", "--compile-cache-days", "--json"],
    "blocks": [],
    "refresh": ["--watchlist", "--json"],
    "deploy": ["--pool", "--watchlist", "--cron", "--launch-name", "--refresh-name"],
}


def help_of(*command: str) -> str:
    out = subprocess.run([sys.executable, "-m", "modelferry.flows", *command, "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_table_below_has_every_command_the_help_lists():
    listed = re.findall(r"^ {4}([a-z][\w-]*)(?:\s|$)", help_of().split("positional arguments:")[1].split("options:")[0],
                        re.M)
    assert listed == list(FLAGS)


@pytest.mark.parametrize("command", FLAGS)
def test_each_command_help_names_each_of_its_flags(command):
    out = help_of(command)
    assert "usage: modelferry " + command in out
    assert len(out.splitlines()) > 5
    # An option's own line starts two spaces in; its wrapped description, which may quote flags, further.
    named = re.findall(r"^  (?:-\w, )?(--[\w-]+)", out.split("\noptions:\n")[1], re.M)
    assert sorted(named) == sorted(["--help", *FLAGS[command]])


@pytest.mark.parametrize("command", FLAGS)
def test_each_command_help_shows_an_example(command):
    lines = [line.strip() for line in help_of(command).splitlines()]
    assert any(line == f"modelferry {command}" or line.startswith(f"modelferry {command} ") for line in lines)


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
    ({"memory_limit": -5}, "--memory-limit"), ({"memory_limit": -1}, "--memory-limit"),
    ({"memory": "lots"}, "--memory"), ({"memory": "64GB+"}, "--memory"), ({"max_model_len": 4}, "--max-model-len"),
    ({"extra_vllm_args": "--enforce-eager --max-model-len 8192"}, "--max-model-len"),
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
    from modelferry.tasks.launch import skytask
    from modelferry.tasks.errors import SettingsError
    from modelferry.tasks.launch.options import LaunchOptions

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
    try:
        assert cli.main(["launch", "acme/m", *flags]) == 2
        assert capsys.readouterr().err.strip() == f"error: {message}"
    except SystemExit as refused:  # a flag with choices: argparse refuses the value itself, naming the flag
        assert refused.code == 2 and flag in capsys.readouterr().err
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
    from modelferry.tasks.launch.options import LaunchOptions

    fields = {f.name: f.default for f in dataclasses.fields(LaunchOptions)}
    params = inspect.signature(stage_and_launch.fn).parameters
    assert {k: params[k].default for k in fields if k in params} == fields
    parser = cli.parser()
    for command in ("launch", "bench", "stage-and-launch"):
        parsed = vars(parser.parse_args([command, "acme/m"]))
        assert {k: parsed[k] for k in fields if k in parsed} == fields, command
    flipped = vars(parser.parse_args(["launch", "acme/m", "--on-demand", "--no-compile-cache", "--vllm-image", "img",
                                      "--extra-vllm-args=--enforce-eager", "--accelerators", "L4:1"]))
    assert LaunchOptions.pick(flipped) == LaunchOptions(use_spot=False, compile_cache=False, vllm_image="img",
                                                        extra_vllm_args="--enforce-eager", accelerators=["L4:1"])


def test_a_command_gets_its_flags_as_typed_values_of_its_own_class():
    from modelferry.flows import cli, commands
    from modelferry.flows.flags import parsed

    p = cli.parser()
    got = parsed(commands.StageFlags, p.parse_args(["-v", "stage", "acme/m", "--include", "*.json", "--no-set-current"]))
    assert got == commands.StageFlags(source="acme/m", include=["*.json"], set_current=False, verbose=True)
    assert parsed(commands.StageFlags, p.parse_args(["stage", "./ckpt"])).exclude == []  # never given: its own list
    cost = parsed(commands.CostFlags, p.parse_args(["cost", "acme/m", "--launches-per-day", "24", "--read-request-mib", "8"]))
    assert (cost.launches_per_day, cost.read_request_mib, cost.gpu_price) == (24.0, 8, None)
    assert type(cost.launches_per_day) is float and type(cost.read_request_mib) is int
    bench = parsed(commands.BenchFlags, p.parse_args(["bench", "acme/m", "--strategy", "both"]))
    assert (bench.strategy, bench.runs, bench.target) == ("both", 2, "local")
    assert [c.flags.__name__ for c in commands.COMMANDS.values()][:3] == ["CheckR2Flags", "StageFlags", "VerifyFlags"]


def test_every_step_of_the_demo_is_a_command_line_the_cli_takes(tmp_path):
    """`make demo` is not run by the suite: each of its parts is, here or against the services
    (stage-and-launch on real vLLM as the vLLM session's node A, prefetch as its node C). What ties
    them is its list of commands: each must parse, and each launch's options pass the check the
    flow runs, so a renamed flag fails here rather than at a user's first `make demo`."""
    from modelferry.flows import cli, commands, demo
    from modelferry.flows.flags import parsed

    p = cli.parser()
    names = []
    for args in demo.steps(tmp_path / "results"):
        command = commands.COMMANDS[args[0]]
        flags = parsed(command.flags, p.parse_args(args))
        if isinstance(flags, commands.LaunchFlags):
            commands._launch_options(flags)
        names.append(args[0])
    assert [n for n in names if n in ("stage", "verify", "stage-and-launch", "bench")] == [
        "stage", "verify", "stage", "stage-and-launch", "bench"]
