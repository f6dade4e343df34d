"""`modelferry cost` against the local bucket: the GPU time of the model's measured cold starts (its
bench rows, where every bench writes them: bench/<model>/<bench id>/ in the bucket) against a start
from the Hub, priced by SkyPilot's own catalog code over a catalog planted where SkyPilot keeps it
(tests/sky_offline.py: offline, SkyPilot would download it), or by --gpu-price."""

from __future__ import annotations

import io

from modelferry.tasks.offline import tiny_llama
from modelferry.tasks.records import layout
from tests import sky_offline
from tests.helpers import start_rows, write_files

# The tiny Llama under a name of its own: the bucket is the session's, where other tests bench it.
MODEL = "acme/priced-llama"


def test_cost_prices_the_measured_cold_starts_against_a_start_from_the_hub(cli, s3, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    write_files(checkpoint, tiny_llama.files())
    assert cli("stage", str(checkpoint), "--name", MODEL).rc == 0
    home = tmp_path / "sky"
    sky_offline.plant(home)
    catalog = {"HOME": str(home), "SKY_RUNTIME_DIR": str(home)}

    unmeasured = cli("cost", MODEL, "--launches-per-day", "24", extra_env=catalog)
    assert unmeasured.rc == 0, unmeasured
    assert f"staged: not measured: no bench rows of {MODEL} in the bucket" in unmeasured.out
    assert "no price: no measured GPU node to look up in SkyPilot's catalog: give --gpu-price" in unmeasured.out

    rows = start_rows(("sky", "stream", "cold", 60, 4), ("sky", "stream", "cold", 90, 5), ("sky", "stream", "cold", 75, 6),
                      ("sky", "stream", "warm", 20, 4), ("local", "stream", "cold", 40, 1), model=MODEL)
    parquet = io.BytesIO()
    rows.to_parquet(parquet, index=False)
    s3.put_bytes(layout.bench_prefix(MODEL, "20261206T100000Z-0123abcd") + "stream-run1.parquet", parquet.getvalue())

    run = cli("cost", MODEL, "--launches-per-day", "24", "--hub-mb-s", "10", "--json", extra_env=catalog)
    assert run.rc == 0, run
    gpu = run.json()["gpu"]
    size = run.json()["gb_per_launch"] * 1e9
    assert gpu["measured"]["seconds"] == 75 and gpu["measured"]["runs"] == 3  # the GPU rows' cold median
    assert gpu["usd_per_hour"] == 0.3  # the planted g6.xlarge spot price in us-east-1
    assert gpu["price_source"] == "SkyPilot's catalog, aws g6.xlarge spot in us-east-1"
    assert gpu["staged"] == {"minutes": 1.25, "usd_per_launch": round(75 / 3600 * 0.3, 4),
                             "usd_per_month": round(75 / 3600 * 0.3 * 720, 2)}
    assert abs(gpu["hub"]["minutes"] - round((75 + size / 10e6) / 60, 2)) < 0.011

    text = cli("cost", MODEL, "--launches-per-day", "24", "--gpu-price", "2.5", extra_env=catalog)
    assert "staged: 1.2 node-minutes = $0.052 a launch, $37.50/month, the median of 3 measured cold starts (stream) " \
           "on L4:1 g6.xlarge spot on aws us-east-1" in text.out, text.out
    assert "at $2.5/hour (--gpu-price)" in text.out
