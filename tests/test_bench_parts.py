"""vLLM log parsing on lines as vLLM prints them, phase arithmetic, and the cost model."""

import pytest

from modelferry.tasks import bench, cost

# Lines as printed by vLLM V1 (EngineCore prefixes, default_loader / gpu_model_runner / monitor / llm_engine).
COLD = """\
INFO 10-06 12:00:02 [__init__.py:216] Automatically detected platform cuda.
(EngineCore_DP0 pid=212) INFO 10-06 12:00:20 [default_loader.py:267] Loading weights took 0.69 seconds
(EngineCore_DP0 pid=212) INFO 10-06 12:00:21 [gpu_model_runner.py:2653] Model loading took 3.4213 GiB and 0.902026 seconds
(EngineCore_DP0 pid=212) INFO 10-06 12:00:22 [backends.py:548] Using cache directory: /root/.cache/vllm/torch_compile_cache/1d2e3f/rank_0_0/backbone for vLLM's torch.compile
(EngineCore_DP0 pid=212) INFO 10-06 12:00:29 [backends.py:559] Dynamo bytecode transform time: 7.51 s
(EngineCore_DP0 pid=212) INFO 10-06 12:00:36 [monitor.py:34] torch.compile takes 14.02 s in total
(EngineCore_DP0 pid=212) INFO 10-06 12:00:40 [gpu_model_runner.py:3480] Graph capturing finished in 17 secs, took 0.48 GiB
(EngineCore_DP0 pid=212) INFO 10-06 12:00:41 [core.py:210] init engine (profile, create kv cache, warmup model) took 34.11 seconds
INFO 10-06 12:00:41 [api_server.py:1971] Starting vLLM API server 0 on http://0.0.0.0:8000
"""
WARM = COLD.replace("Dynamo bytecode transform time: 7.51 s",
                    "Directly load the compiled graph(s) for shape None from the cache, took 2.104 s")


def test_parse_cold_vllm_log():
    got = bench.parse_vllm_log(COLD)
    assert got == {"weights_s": 0.69, "model_load_gib": 3.4213, "model_load_s": 0.902026, "dynamo_s": 7.51,
                   "compile_s": 14.02, "graph_capture_s": 17.0, "init_engine_s": 34.11, "compile_cache": "miss"}


def test_parse_cache_hit_and_newer_model_loading_format():
    assert bench.parse_vllm_log(WARM)["compile_cache"] == "hit"
    newer = "Model loading took 55.22 GiB memory and 20.3s\nGraph capturing finished in 18 secs, took 0.96 GiB"
    assert bench.parse_vllm_log(newer) == {"model_load_gib": 55.22, "model_load_s": 20.3, "graph_capture_s": 18.0}
    assert bench.parse_vllm_log("nothing here") == {}


def test_phases_are_consecutive_and_sum_to_total():
    marks = {"request": 100.0, "spawned": 101.5, "loaded": 104.0, "ready": 104.25, "first_token": 104.5}
    p = bench.phases(marks)
    assert p["provision_s"] is None
    assert (p["setup_s"], p["load_s"], p["engine_s"], p["first_token_s"]) == (1.5, 2.5, 0.25, 0.25)
    assert p["total_s"] == pytest.approx(sum(v for k, v in p.items() if k != "total_s" and v is not None))
    assert bench.phases({**marks, "up": 100.5})["provision_s"] == 0.5


def test_cost_compares_s3_egress_with_r2():
    c = cost.monthly(16 * 10**9, launches_per_day=24)
    assert c["launches_per_month"] == 720 and c["s3_egress_usd"] == pytest.approx(720 * 16 * 0.09)
    assert c["r2_storage_usd"] == pytest.approx(16 * 0.015)
    assert c["r2_read_ops"] == 720 * (-(-16 * 10**9 // (16 * 2**20)) + 1)
    assert c["r2_usd"] < c["s3_egress_usd"] and c["saving_vs_s3_usd"] > 0
    with pytest.raises(ValueError):
        cost.monthly(-1, 1)
