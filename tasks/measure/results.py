"""The results of a bench: one row per start (`StartRow`, the one owner of its columns), one
Parquet file per run, the stacked-bar plot of its phases, the winner of a strategy comparison, and
the Markdown summary for Prefect."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from modelferry.tasks.measure.startlog import PHASES


@dataclass(frozen=True)
class StartRow:
    """One measured start, as the table, the plot, the Parquet files and `--json` show it."""

    model: str
    revision: str
    target: str  # local | sky
    source: str  # r2 | hub
    strategy: str  # stream | prefetch | hub
    kind: str  # cold (a new node) | warm (run again on the same node)
    run: int
    # the phases (startlog.PHASES), consecutive, summing to total_s; None where a mark is missing
    provision_s: float | None
    setup_s: float | None
    boot_s: float | None
    weights_s: float | None
    engine_s: float | None
    first_token_s: float | None
    total_s: float
    context: int | None  # the context vLLM served, tokens
    compile_s: float | None
    graph_capture_s: float | None
    init_engine_s: float | None
    host_peak_gib: float | None
    compile_cache: str
    cache_saved: str | None
    vllm: str | None  # as the server reports it
    streamer: str | None  # runai-model-streamer/runai-model-streamer-s3 versions on the node
    gpu: str | None
    gpus: int | None
    instance_type: str | None
    cloud: str | None
    region: str | None
    spot: bool | None
    started_at: str

    def record(self) -> dict:
        return dataclasses.asdict(self)


PLACEMENT = ("gpu", "gpus", "instance_type", "cloud", "region", "spot")  # where a start ran
TABLE = ["strategy", "kind", "run", *PHASES, "total_s", "context", "compile_cache"]  # what the terminal shows


def save_run(rows: list[StartRow], results_dir: Path, run_file: str) -> Path:
    """One Parquet file per run (no appends racing between runs)."""
    import pandas as pd

    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{run_file}.parquet"
    pd.DataFrame([row.record() for row in rows]).to_parquet(path, index=False)
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
