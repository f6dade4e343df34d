"""`launch --dry-run` prints the task as it would be launched: each GPU option's host memory is in it,
the `--memory` override too, and no unbounded streamer buffer."""

import yaml

from tests.helpers import DRY_RUN_API_KEY, TINY


def dry_run(cli, *flags: str) -> dict:
    run = cli("launch", TINY, "--target", "sky", "--dry-run", *flags, extra_env={"VLLM_API_KEY": DRY_RUN_API_KEY})
    assert run.rc == 0, run
    return yaml.safe_load(run.out.split("\n", 1)[1])


def test_the_dry_run_shows_each_gpu_options_memory_and_the_override(cli):
    assert cli("stage", TINY).rc == 0
    cfg = dry_run(cli, "--accelerators", "L4:1,H100:4")  # 4: MiniLM's 12 heads split across 8 GPUs are refused
    # a 90 MB model: the floors alone, one GPU's within a 16 GiB host, four GPUs' more
    assert cfg["resources"]["any_of"] == [{"accelerators": {"L4": 1}, "memory": "12+"},
                                          {"accelerators": {"H100": 4}, "memory": "21+"}]
    assert cfg["envs"]["LOADER_MEMORY_LIMIT"] == "auto" and "-1" not in cfg["envs"].values()
    # from the manifest's top-level safetensors: the node stays under the ring they want
    assert int(cfg["envs"]["LOADER_WEIGHTS_BYTES"]) >= int(cfg["envs"]["LOADER_LARGEST_FILE"]) > 0
    cfg = dry_run(cli, "--memory", "64+", "--memory-limit", str(8 * 2**30))
    assert {o["memory"] for o in cfg["resources"]["any_of"]} == {"64+"}
    assert cfg["envs"]["LOADER_MEMORY_LIMIT"] == str(8 * 2**30)
