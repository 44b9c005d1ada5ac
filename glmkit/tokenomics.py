"""Tokenomics: from measured throughput to dollars per million tokens, against an API's price.

The seed's arithmetic, made repeatable: a node costs dollars per hour (cloud) or a purchase price spread
over its useful hours (on-prem); it produces tokens per second (measured by `glmkit bench` or read from
docs/benchmarks.md); the quotient is dollars per token. Batching multiplies tokens per second at nearly
the same cost per step, which is what moves self-hosting towards an API's price.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .config import REPO_ROOT

HOURS_PER_YEAR = 24 * 365
BENCHMARKS_FILE = REPO_ROOT / "docs" / "benchmarks.md"


@dataclass(frozen=True)
class CloudNode:
    """A rented node: dollars per hour, paid whether busy or not."""

    dollars_per_hour: float

    def __post_init__(self):
        if not self.dollars_per_hour > 0:
            raise ValueError(f"dollars_per_hour must be > 0, got {self.dollars_per_hour}")

    def cost_per_busy_hour(self) -> float:
        return self.dollars_per_hour


@dataclass(frozen=True)
class OwnedNode:
    """A bought node: purchase price spread over its busy hours, plus power."""

    purchase_dollars: float
    amortisation_years: float = 3.0
    utilisation: float = 1.0  # fraction of hours it is generating
    power_kw: float = 0.0
    dollars_per_kwh: float = 0.0

    def __post_init__(self):
        if not self.purchase_dollars > 0 or not self.amortisation_years > 0:
            raise ValueError("purchase_dollars and amortisation_years must be > 0")
        if not 0 < self.utilisation <= 1:
            raise ValueError(f"utilisation must be in (0, 1], got {self.utilisation}")
        if self.power_kw < 0 or self.dollars_per_kwh < 0:
            raise ValueError("power_kw and dollars_per_kwh must be >= 0")

    def cost_per_busy_hour(self) -> float:
        busy_hours = self.amortisation_years * HOURS_PER_YEAR * self.utilisation
        return self.purchase_dollars / busy_hours + self.power_kw * self.dollars_per_kwh


def dollars_per_million_tokens(node: CloudNode | OwnedNode, tokens_per_second: float) -> float:
    """What a million generated tokens cost on `node` at `tokens_per_second`."""
    if not tokens_per_second > 0:
        raise ValueError(f"tokens_per_second must be > 0, got {tokens_per_second}")
    return node.cost_per_busy_hour() / (tokens_per_second * 3600) * 1e6


def api_dollars_per_million(dollars_per_1k_tokens: float) -> float:
    """An API price per 1K tokens expressed per million tokens."""
    if not dollars_per_1k_tokens > 0:
        raise ValueError(f"the API price must be > 0, got {dollars_per_1k_tokens}")
    return dollars_per_1k_tokens * 1000


def seed_arithmetic(tokens=100, seconds=5.0, dollars_per_hour=10.0, api_dollars_per_1k=0.02,
                    purchase_dollars=200_000.0) -> pd.DataFrame:
    """The seed's own numbers: ~100 tokens per 5 s on 8xA100 at ~$10/hour, against the API's price."""
    rate = tokens / seconds
    node = CloudNode(dollars_per_hour)
    per_100_self = dollars_per_million_tokens(node, rate) / 1e4
    per_100_api = api_dollars_per_million(api_dollars_per_1k) / 1e4
    api_tokens_for_purchase = purchase_dollars / api_dollars_per_million(api_dollars_per_1k) * 1e6
    return pd.DataFrame([
        {"quantity": "throughput (tokens/s)", "value": rate},
        {"quantity": "self-hosted $ per 100 tokens (cloud node)", "value": per_100_self},
        {"quantity": "API $ per 100 tokens", "value": per_100_api},
        {"quantity": "self-hosted / API cost ratio", "value": per_100_self / per_100_api},
        {"quantity": f"API tokens that ${purchase_dollars:,.0f} buys", "value": api_tokens_for_purchase},
    ])


_ROW = re.compile(r"^\|(.+)\|\s*$")


def read_benchmarks(path: str | Path = BENCHMARKS_FILE) -> pd.DataFrame:
    """The throughput table of docs/benchmarks.md (the one with a `tokens_per_s` column) as a DataFrame."""
    lines = Path(path).read_text().splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "tokens_per_s" in cells and i + 1 < len(lines):
            rows = []
            for body in lines[i + 2:]:
                if not _ROW.match(body.strip()):
                    break
                values = [c.strip().strip("`") for c in body.strip().strip("|").split("|")]
                rows.append(dict(zip(cells, values)))
            table = pd.DataFrame(rows)
            for column in ("gpus", "batch", "ms_per_token", "tokens_per_s"):
                if column in table:
                    table[column] = pd.to_numeric(table[column], errors="coerce")
            return table
    raise ValueError(f"{path} has no table with a tokens_per_s column")


def cost_table(throughput: pd.DataFrame, node: CloudNode | OwnedNode, api_dollars_per_1k: float) -> pd.DataFrame:
    """Per row of a throughput table: $ per 1M tokens on `node`, the API's, and their ratio."""
    table = throughput.copy()
    table["dollars_per_1m"] = [dollars_per_million_tokens(node, t) for t in table["tokens_per_s"]]
    table["api_dollars_per_1m"] = api_dollars_per_million(api_dollars_per_1k)
    table["self_over_api"] = table["dollars_per_1m"] / table["api_dollars_per_1m"]
    return table


def break_even_batch(ms_per_token_at: dict[int, float], node: CloudNode | OwnedNode,
                     api_dollars_per_1k: float) -> float | None:
    """Smallest batch whose $/1M tokens reaches the API's, interpolating the measured step times.

    `ms_per_token_at` maps batch size -> milliseconds per decode step (each step yields `batch` tokens).
    Returns None when even the largest measured batch stays dearer than the API.
    """
    if not ms_per_token_at:
        raise ValueError("no measurements given")
    target = api_dollars_per_million(api_dollars_per_1k)
    points = sorted(ms_per_token_at.items())
    costs = [(b, dollars_per_million_tokens(node, b * 1000.0 / ms)) for b, ms in points]
    if costs[0][1] <= target:
        return float(costs[0][0])
    for (b0, c0), (b1, c1) in zip(costs, costs[1:]):
        if c1 <= target:
            # Cost falls roughly like 1/batch between measurements: interpolate in 1/cost.
            return b0 + (b1 - b0) * (1 / target - 1 / c0) / (1 / c1 - 1 / c0)
    return None


def setup_columns(table: pd.DataFrame) -> list[str]:
    """The columns that name one measured setup: card (when the table has it), precision and GPU count."""
    return [c for c in ("card", "precision", "gpus") if c in table]


def cost_by_batch(throughput: pd.DataFrame, node: CloudNode | OwnedNode, api_dollars_per_1k: float,
                  model: str | None = None) -> pd.DataFrame:
    """$/1M tokens per (card, precision, gpus, batch) of one model's measurements, sorted for plotting."""
    rows = throughput if model is None else throughput[throughput["model"] == model]
    if rows.empty:
        raise ValueError(f"no measurements for model {model!r}; measured: {sorted(set(throughput['model']))}")
    table = cost_table(rows, node, api_dollars_per_1k)
    return table.sort_values(setup_columns(table) + ["batch"]).reset_index(drop=True)


def break_even_by_setup(table: pd.DataFrame, node: CloudNode | OwnedNode, api_dollars_per_1k: float) -> pd.DataFrame:
    """For each setup (card, precision, gpus) of a cost table: the smallest batch as cheap as the API, and why.

    `break_even_batch` is None where no measured batch reaches the API's price; `note` then says which
    batches were measured and how far the largest is from the API, so an empty cell is never unexplained.
    """
    keys = setup_columns(table)
    target = api_dollars_per_million(api_dollars_per_1k)
    rows = []
    for setup, group in table.groupby(keys):
        steps = dict(zip(group["batch"].astype(int), group["ms_per_token"]))
        found = break_even_batch(steps, node, api_dollars_per_1k)
        measured = sorted(steps)
        if found is None:
            largest = dollars_per_million_tokens(node, measured[-1] * 1000.0 / steps[measured[-1]])
            only = f"only batch {measured[0]} was measured" if len(measured) == 1 else \
                f"measured batches {', '.join(map(str, measured))}"
            note = (f"not reached: {only}, and batch {measured[-1]} costs {largest / target:.2f}x the API's "
                    f"price; measure larger batches (glmkit bench --batches 1,8,32)")
        elif found == measured[0]:
            note = f"already at batch {measured[0]}, the smallest measured"
        else:
            note = "interpolated between the measured batches around it"
        rows.append({**dict(zip(keys, setup)), "break_even_batch": found, "note": note})
    return pd.DataFrame(rows, columns=keys + ["break_even_batch", "note"])


def plot_cost_by_batch(table: pd.DataFrame, api_dollars_per_1k: float, title: str = ""):
    """$/1M tokens against batch size, one line per setup (card, precision, gpus), the API's price as a line."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    keys = setup_columns(table)
    for setup, group in table.groupby(keys):
        values = dict(zip(keys, setup))
        label = " ".join(filter(None, [values.get("card"), values["precision"]])) + f", {values['gpus']} GPU(s)"
        axes.plot(group["batch"], group["dollars_per_1m"], marker="o", label=label)
    axes.axhline(api_dollars_per_1million := api_dollars_per_million(api_dollars_per_1k), color="gray",
                 linestyle="--", label=f"API ${api_dollars_per_1million:,.2f}/1M")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("batch size")
    axes.set_ylabel("$ per 1M generated tokens")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    return figure
