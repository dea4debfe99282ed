"""Cost per 1,000 embeddings from an editable price table (``config/prices.yaml``).

cost/1k = hourly price / (texts/s × 3600) × 1000. CPU rows use throughput
measured by this benchmark run on this machine; a larger CPU class is scaled
from it by vCPU count (one 2-thread worker per 2 vCPUs, assuming linear scaling,
which the report says). GPU rows come from the table, each with its source,
because nothing here runs a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from embedkit.core.configfile import load_yaml
from embedkit.core.settings import get_settings


class Hardware(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str = Field(pattern="^(cpu|gpu)$")
    hourly_usd: float = Field(gt=0)
    price_source: str = Field(min_length=1)
    vcpus: int | None = Field(None, ge=1)


class GpuThroughput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    well_batched: float = Field(gt=0)
    well_batched_source: str = Field(min_length=1)
    under_used: float = Field(gt=0)
    under_used_source: str = Field(min_length=1)


class PriceTable(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hardware: dict[str, Hardware]
    gpu_throughput: dict[str, GpuThroughput] = Field(default_factory=dict)


def load_prices(path: Path | None = None) -> PriceTable:
    """``path``, else ``prices.yaml`` in ``settings.config_dir``."""
    path = path or get_settings().config_dir / "prices.yaml"
    return load_yaml(path, PriceTable, "price table")


def per_1k(hourly_usd: float, texts_per_s: float) -> float:
    """USD per 1,000 embeddings at a sustained ``texts_per_s``."""
    return hourly_usd / (texts_per_s * 3600) * 1000


def cost_rows(
    measured: dict[str, float], measured_vcpus: int, table: PriceTable
) -> list[dict[str, Any]]:
    """One row per (configuration, hardware class): measured CPU configs and tabled GPU figures.

    ``measured`` maps a configuration name (e.g. ``engine[dynamic-int8] b32``) to
    texts/s on this machine with ``measured_vcpus`` cores.
    """
    rows: list[dict[str, Any]] = []
    for hw_name, hw in table.hardware.items():
        # (configuration, texts/s, where that throughput comes from)
        rates: list[tuple[str, float, str]] = []
        if hw.kind == "cpu":
            scale = (hw.vcpus or measured_vcpus) / measured_vcpus
            source = "measured here"
            if scale != 1:
                source += f" × {scale:g} (linear scaling with vCPUs assumed)"
            rates = [(config, tps * scale, source) for config, tps in measured.items()]
        elif hw_name in table.gpu_throughput:
            g = table.gpu_throughput[hw_name]
            rates = [
                ("well batched", g.well_batched, g.well_batched_source),
                ("under-used (single texts, low concurrency)", g.under_used, g.under_used_source),
            ]
        rows.extend(
            {
                "hardware": hw_name,
                "config": config,
                "texts_per_s": rate,
                "usd_per_1k": per_1k(hw.hourly_usd, rate),
                "throughput_source": source,
                "price_source": hw.price_source,
            }
            for config, rate, source in rates
        )
    return rows
