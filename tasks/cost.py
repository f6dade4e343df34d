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
