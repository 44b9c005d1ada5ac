"""Tokenomics arithmetic: the seed's numbers, cost per token, on-prem amortisation, break-even batch."""
from __future__ import annotations

import math

import pytest

from glmkit.tokenomics import (CloudNode, OwnedNode, break_even_batch, cost_table, dollars_per_million_tokens,
                               read_benchmarks, seed_arithmetic)


def test_seed_arithmetic():
    table = seed_arithmetic().set_index("quantity")["value"]
    assert table["throughput (tokens/s)"] == 20
    # $10/hour for 5 s is $0.0139: "about $0.01 per 100 tokens"
    assert math.isclose(table["self-hosted $ per 100 tokens (cloud node)"], 10 / 3600 * 5, rel_tol=1e-9)
    assert math.isclose(table["API $ per 100 tokens"], 0.002)
    assert math.isclose(table["API tokens that $200,000 buys"], 1e10)  # "about 10 billion API tokens"


def test_dollars_per_million_and_owned_nodes():
    assert math.isclose(dollars_per_million_tokens(CloudNode(36.0), 10.0), 1000.0)
    owned = OwnedNode(purchase_dollars=87_600, amortisation_years=1, utilisation=0.5)
    assert math.isclose(owned.cost_per_busy_hour(), 20.0)  # 87600 $ over 4380 busy hours
    powered = OwnedNode(87_600, 1, 0.5, power_kw=6.5, dollars_per_kwh=0.2)
    assert math.isclose(powered.cost_per_busy_hour(), 21.3)
    with pytest.raises(ValueError, match="utilisation"):
        OwnedNode(1000, 3, utilisation=0)
    with pytest.raises(ValueError, match="tokens_per_second"):
        dollars_per_million_tokens(CloudNode(1.0), 0)


def test_break_even_batch_interpolates_and_reports_none():
    node = CloudNode(36.0)  # $0.01 per second
    # batch 1: 100 ms/step -> 10 tok/s -> $1000/1M; batch 8: 100 ms -> 80 tok/s -> $125/1M
    steps = {1: 100.0, 8: 100.0}
    assert break_even_batch(steps, node, api_dollars_per_1k=2.0) == 1.0  # API $2000/1M: cheaper already
    assert break_even_batch(steps, node, api_dollars_per_1k=0.0625) is None  # $62.5/1M: never
    found = break_even_batch(steps, node, api_dollars_per_1k=0.25)  # $250/1M: 40 tok/s -> batch 4
    assert math.isclose(found, 4.0)


def test_cost_table_from_a_benchmarks_file(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# x\n\n| card | precision | gpus | batch | ms_per_token | tokens_per_s | command |\n"
                   "|---|---|---|---|---|---|---|\n"
                   "| H100 | fp16 | 2 | 1 | 50 | 20 | `glmkit bench` |\n"
                   "| H100 | fp16 | 2 | 32 | 80 | 400 | `glmkit bench` |\n\nafter\n")
    table = cost_table(read_benchmarks(doc), CloudNode(7.2), api_dollars_per_1k=0.02)
    assert table["batch"].tolist() == [1, 32]
    assert math.isclose(table["dollars_per_1m"][0], 7.2 / (20 * 3600) * 1e6)
    assert math.isclose(table["self_over_api"][1], (7.2 / (400 * 3600) * 1e6) / 20.0)


def test_calculator_widget_over_the_recorded_benchmarks(tmp_path):
    from glmkit.widgets import TokenomicsCalculator

    table = read_benchmarks()  # docs/benchmarks.md as shipped
    model = "glm-130b shape, 12 layers (random)"
    tool = TokenomicsCalculator(table, model=model, dollars_per_hour=10.0, api_dollars_per_1k=0.02)
    assert tool.last_error is None, tool.last_error
    assert set(tool.table["batch"]) >= {1, 32}
    batch32 = tool.table[(tool.table["batch"] == 32) & (tool.table["precision"] == "fp16")].iloc[0]
    assert math.isclose(batch32["dollars_per_1m"], 10.0 / (batch32["tokens_per_s"] * 3600) * 1e6)
    assert "break_even_batch" in tool.break_even
    tool.kind.value = "owned"  # switching the node recomputes everything
    owned = OwnedNode(tool.purchase.value, tool.years.value, tool.utilisation.value)
    assert math.isclose(tool.table["dollars_per_1m"].iloc[0],
                        dollars_per_million_tokens(owned, tool.table["tokens_per_s"].iloc[0]))
    assert tool.to_csv(tmp_path / "cost.csv").read_text().startswith("date,")
    tool.close()
