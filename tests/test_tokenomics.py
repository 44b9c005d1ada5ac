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


MODEL_12 = "glm-130b shape, 12 layers (random)"  # H100 and H200 at 1 GPU, H200 at 2 (batch 1 only) and 4


def test_calculator_greys_out_the_inputs_the_node_kind_does_not_use():
    from glmkit.widgets import TokenomicsCalculator

    tool = TokenomicsCalculator(read_benchmarks(), model=MODEL_12)
    owned_inputs = (tool.purchase, tool.years, tool.utilisation)
    assert not tool.dollars_per_hour.disabled and all(x.disabled for x in owned_inputs)
    tool.kind.value = "owned"
    assert tool.dollars_per_hour.disabled and not any(x.disabled for x in owned_inputs)
    tool.kind.value = "cloud"
    assert not tool.dollars_per_hour.disabled and all(x.disabled for x in owned_inputs)
    tool.close()


def test_one_line_and_one_break_even_per_card():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from glmkit.tokenomics import break_even_by_setup, cost_by_batch, plot_cost_by_batch

    node = CloudNode(10.0)
    table = cost_by_batch(read_benchmarks(), node, 0.02, MODEL_12)
    figure = plot_cost_by_batch(table, 0.02)
    lines = {line.get_label(): list(line.get_xdata()) for line in figure.axes[0].get_lines()
             if not line.get_label().startswith("API")}
    plt.close(figure)
    assert lines["H100 fp16, 1 GPU(s)"] == [1, 32] and lines["H200 fp16, 1 GPU(s)"] == [1, 32], lines
    for label, batches in lines.items():  # a line never doubles back to join another card's points
        assert batches == sorted(set(batches)), (label, batches)
    even = break_even_by_setup(table, node, 0.02)
    assert sorted(zip(even["card"], even["gpus"])) == [("H100", 1), ("H200", 1), ("H200", 2), ("H200", 4)]
    # Each card's break-even comes from its own measurements: the H100 is slower, so it needs a larger batch.
    one_gpu = even[even["gpus"] == 1].set_index("card")["break_even_batch"]
    assert one_gpu["H100"] > one_gpu["H200"] >= 1


def test_a_break_even_that_no_measured_batch_reaches_is_explained():
    from glmkit.widgets import TokenomicsCalculator

    tool = TokenomicsCalculator(read_benchmarks(), model=MODEL_12)
    tool.kind.value = "owned"  # $200,000 over 3 years at 50 %: the 2-GPU row (batch 1 only) stays dearer
    row = tool.break_even[tool.break_even["gpus"] == 2].iloc[0]
    assert row["break_even_batch"] is None or math.isnan(row["break_even_batch"])
    assert "only batch 1 was measured" in row["note"] and "x the API's price" in row["note"]
    ratio = float(row["note"].split("costs ")[1].split("x")[0])
    two = tool.table[tool.table["gpus"] == 2].iloc[0]
    assert math.isclose(ratio, two["self_over_api"], rel_tol=0.01)
    assert "NaN" not in tool.table_view.value and "not reached" in tool.table_view.value
    tool.close()
