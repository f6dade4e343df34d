"""Monthly cost of cold starts: pulling the weights from the Hub or S3 each launch, against keeping
them in R2 (storage + read operations; R2 egress is free). Pure arithmetic; prices are options."""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Prices:
    s3_egress_per_gb: float = 0.09  # AWS S3 internet egress, first 10 TB tier, USD/GB
    r2_storage_per_gb_month: float = 0.015  # Cloudflare R2 standard storage, USD/GB-month
    r2_class_b_per_million: float = 0.36  # R2 reads (GetObject, HeadObject), USD per million
    r2_class_a_per_million: float = 4.50  # R2 writes and listings, USD per million
    hub_egress_per_gb: float = 0.0  # the Hub doesn't bill downloads; its cost is time


def monthly(model_bytes: int, launches_per_day: float, prices: Prices = Prices(), read_request_bytes: int = 16 * 2**20,
            files: int = 1, days: float = 30.0) -> dict:
    """Cost per month of `launches_per_day` cold starts of a `model_bytes` model.
    Each launch reads the weights in `read_request_bytes` ranged GETs, plus a listing and a HEAD per file."""
    if model_bytes < 0 or launches_per_day < 0 or read_request_bytes <= 0:
        raise ValueError("sizes and launch counts must be positive")
    launches = launches_per_day * days
    gb = model_bytes / GB
    gets = launches * (-(-model_bytes // read_request_bytes) + files)
    lists = launches
    r2 = (gb * prices.r2_storage_per_gb_month + gets / 1e6 * prices.r2_class_b_per_million
          + lists / 1e6 * prices.r2_class_a_per_million)
    return {
        "launches_per_month": round(launches, 1),
        "gb_per_launch": round(gb, 3),
        "hub_usd": round(launches * gb * prices.hub_egress_per_gb, 2),
        "s3_egress_usd": round(launches * gb * prices.s3_egress_per_gb, 2),
        "r2_usd": round(r2, 2),
        "r2_storage_usd": round(gb * prices.r2_storage_per_gb_month, 2),
        "r2_read_ops": int(gets),
        "saving_vs_s3_usd": round(launches * gb * prices.s3_egress_per_gb - r2, 2),
    }


# --- the GPU time of a cold start ----------------------------------------------------------------

# The Hub rate a start is estimated at when nothing better is known: the 8-12 minutes our users
# report for a cold start of an 8B model (16 GB) downloading from the Hub, taken at 10 minutes:
# 16e9 bytes / 600 s. `cost --hub-mb-s` sets the rate their own nodes see.
HUB_MB_S = 27.0


@dataclass(frozen=True)
class MeasuredStart:
    """The median of a model's measured cold starts, and where they ran."""

    seconds: float  # request to first token: the node is billed for all of it
    weights_s: float  # of which loading the weights
    runs: int
    target: str  # sky | local
    strategy: str
    gpu: str | None = None
    gpus: int | None = None
    instance_type: str | None = None
    cloud: str | None = None
    region: str | None = None
    spot: bool | None = None

    def where(self) -> str:
        if self.target == "local":
            return "the local target (this machine's CPU, not a GPU node)"
        place = " ".join(str(p) for p in (self.cloud, self.region) if p)
        return f"{self.gpu}:{self.gpus} {self.instance_type} {'spot' if self.spot else 'on-demand'} on {place}"


def measured_start(rows) -> MeasuredStart | None:
    """The median cold start among a model's bench rows (a DataFrame of `StartRow` records), from
    the GPU nodes where any were measured, else from the local target; None without a cold row."""
    cold = rows[rows["kind"] == "cold"] if len(rows) else rows
    if not len(cold):
        return None
    on_gpus = cold[cold["target"] == "sky"]
    chosen = on_gpus if len(on_gpus) else cold
    # the strategy whose median start is shortest: what a user would launch with
    medians = chosen.groupby("strategy")["total_s"].median()
    strategy = str(medians.idxmin())
    runs = chosen[chosen["strategy"] == strategy]
    last = runs.sort_values("started_at").iloc[-1]  # where the newest of them ran

    def value(name):
        v = last.get(name)
        return None if v is None or v != v else v.item() if hasattr(v, "item") else v

    return MeasuredStart(float(runs["total_s"].median()), float(runs["weights_s"].fillna(0).median()), len(runs),
                         str(last["target"]), strategy, value("gpu"), value("gpus"), value("instance_type"),
                         value("cloud"), value("region"), value("spot"))


def hub_start_s(model_bytes: int, measured: MeasuredStart | None, hub_mb_s: float = HUB_MB_S) -> float:
    """A start from the Hub: the measured start with its weights phase replaced by a download of
    the model at `hub_mb_s` and a load of it from the node's disk (taken to be as long as the
    measured weights phase), i.e. the measured start plus the download; without a measured start,
    the download alone."""
    if hub_mb_s <= 0:
        raise ValueError("the Hub download rate must be positive")
    return (measured.seconds if measured else 0.0) + model_bytes / (hub_mb_s * 1e6)


def start_cost(seconds: float, usd_per_hour: float | None, launches_per_month: float) -> dict:
    """A start's node-minutes and, with a price, what one start and a month of them cost."""
    minutes = seconds / 60
    if usd_per_hour is None:
        return {"minutes": round(minutes, 2)}
    per_launch = seconds / 3600 * usd_per_hour
    return {"minutes": round(minutes, 2), "usd_per_launch": round(per_launch, 4),
            "usd_per_month": round(per_launch * launches_per_month, 2)}
