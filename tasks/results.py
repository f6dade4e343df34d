"""The results of a bench: one Parquet file per run, the stacked-bar plot of its phases, the winner
of a strategy comparison, and the Markdown summary for Prefect."""

from __future__ import annotations

from pathlib import Path

from modelferry.tasks.startlog import PHASES


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
