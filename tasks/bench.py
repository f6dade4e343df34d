"""Cold-start measurement: phase arithmetic, vLLM's log lines, the results table, the plot.

Phases are consecutive: request -> node up (provision) -> server process start (setup) -> weights
loaded (load) -> /health answers (engine) -> first completion (first_token); they sum to total_s.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

PHASES = ["provision_s", "setup_s", "load_s", "engine_s", "first_token_s"]

# Formats as vLLM prints them (logger calls in vLLM's model loaders, gpu_model_runner, compilation
# monitor and llm_engine); the second "Model loading" form is newer vLLM's.
_PATTERNS = {
    "weights_s": re.compile(r"Loading weights took ([\d.]+) seconds"),
    "model_load_gib": re.compile(r"Model loading took ([\d.]+) GiB"),
    "model_load_s": re.compile(r"Model loading took [\d.]+ GiB(?: memory)? and ([\d.]+) ?s"),
    "dynamo_s": re.compile(r"Dynamo bytecode transform time: ([\d.]+) s"),
    "compile_s": re.compile(r"torch\.compile takes ([\d.]+) s in total"),
    "graph_capture_s": re.compile(r"Graph capturing finished in ([\d.]+) secs?"),
    "init_engine_s": re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) seconds"),
}
_CACHE_HIT = re.compile(r"Directly load the compiled graph\(s\) for shape .* from the cache")
_OUR_CACHE = re.compile(r"modelferry compile cache: (hit|miss|off|refused)")
_CACHE_DIR = re.compile(r"Using cache directory: (\S+) for vLLM's torch\.compile")


def parse_vllm_log(text: str) -> dict:
    """Durations vLLM reports about its own start-up (seconds), plus whether the compile cache hit."""
    out: dict = {}
    for key, pattern in _PATTERNS.items():
        found = pattern.findall(text)
        if found:
            out[key] = float(found[-1])  # a restart in the same log: the latest start counts
    ours = _OUR_CACHE.findall(text)
    if ours:  # what our restore step said on this node
        out["compile_cache"] = ours[-1]
    elif _CACHE_DIR.search(text):
        out["compile_cache"] = "hit" if _CACHE_HIT.search(text) else "miss"
    return out


def phases(marks: dict[str, float]) -> dict[str, float | None]:
    """Consecutive phase durations from wall-clock marks: request, up, spawned, loaded, ready, first_token.
    A missing mark (no provisioning on the local target) makes its phase null."""
    order = [("provision_s", "up"), ("setup_s", "spawned"), ("load_s", "loaded"), ("engine_s", "ready"),
             ("first_token_s", "first_token")]
    out: dict[str, float | None] = {}
    prev = marks["request"]
    for phase, mark in order:
        if mark in marks:
            out[phase] = round(marks[mark] - prev, 3)
            prev = marks[mark]
        else:
            out[phase] = None
    out["total_s"] = round(prev - marks["request"], 3)
    return out


def save_run(rows: list[dict], results_dir: Path, run_file: str) -> Path:
    """One Parquet file per run (no appends racing between runs)."""
    import pandas as pd

    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{run_file}.parquet"
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def read_results(results_dir: Path):
    import pandas as pd

    files = sorted(results_dir.glob("*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else pd.DataFrame()


def plot(df, path: Path, title: str) -> Path:
    """Stacked bars of the phases, one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.strategy}\n{r.kind} #{r.run}" for r in df.itertuples()]
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(df)), 4))
    bottom = [0.0] * len(df)
    for phase in PHASES:
        values = [float(v) if v == v and v is not None else 0.0 for v in df[phase]]
        ax.bar(labels, values, bottom=bottom, label=phase.removesuffix("_s"))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("seconds")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, metadata={"Software": "modelferry"})
    plt.close(fig)
    return path


def winner(df) -> str | None:
    """The strategy with the lower median total, when more than one ran."""
    if df.empty or df["strategy"].nunique() < 2:
        return None
    med = df.groupby("strategy")["total_s"].median().sort_values()
    return f"{med.index[0]} won: median total {med.iloc[0]:.2f} s vs {med.index[1]} {med.iloc[1]:.2f} s"


def markdown(df, png: Path | None, note: str = "") -> str:
    import base64

    text = "## Cold start, phase by phase\n\n" + df.to_markdown(index=False) + "\n"
    if note:
        text += f"\n{note}\n"
    if png and png.exists():
        data = base64.b64encode(png.read_bytes()).decode()
        text += f"\n![phases](data:image/png;base64,{data})\n"
    return text


def buffer(df) -> bytes:
    b = io.BytesIO()
    df.to_parquet(b, index=False)
    return b.getvalue()
