"""Cells of notebooks/07-tokenomics.ipynb."""
from __future__ import annotations

from .cells import md, code, config

CELLS = [
    md("""\
# 07 · Tokenomics: what a token costs you

The seed's question: is self-hosting GLM-130B cheaper than an API? Its answer came from one hand-measured
number — about 100 tokens per 5 s on 8×A100 at about $10/hour. This notebook redoes that arithmetic, then the
same with measured throughput: the GPU numbers recorded in `docs/benchmarks.md`, and a measurement of your own
machine with `glmkit bench`. Batching is what changes the answer: a decode step streams the weights once for
the whole batch."""),
    config("""\
CONFIG = "glm-tiny"; LAYERS = None; BATCHES = (1, 4)  # on a GPU node: CONFIG = "glm-130b"; LAYERS = 12; BATCHES = (1, 8, 32)"""),
    code("""\
import tempfile
from pathlib import Path

import pandas as pd

from glmkit import tokenomics as tk
from glmkit.widgets import TokenomicsCalculator"""),
    md("""\
## The seed's arithmetic

$10/hour for 5 s is about $0.014 per 100 tokens; the API sold 100 tokens for $0.002 ($0.02 per 1K). And
$200k of hardware buys about 10 billion API tokens."""),
    code("""\
tk.seed_arithmetic().style.format({"value": "{:,.4g}"})"""),
    md("""\
## Recorded GPU throughput

`docs/benchmarks.md` holds the numbers measured on the GPU machines (card, GPUs, precision, batch, ms per
decode step). The calculator below prices them: switch between a cloud node and an owned one (the inputs the
other kind uses are greyed out), change the prices, and the table, the break-even batch and the plot follow.
Each card, precision and GPU count is its own line and its own break-even row."""),
    code("""\
recorded = tk.read_benchmarks()
recorded[["card", "gpus", "model", "precision", "batch", "ms_per_token", "tokens_per_s"]]"""),
    code("""\
calculator = TokenomicsCalculator(recorded, model="glm-130b shape, 12 layers (random)",
                                  dollars_per_hour=10.0, api_dollars_per_1k=0.02)
calculator"""),
    md("""\
Read it as: at batch 1 a GPU spends the whole weight-streaming time on one token, so the price per token is
high; at batch 32 the same step yields 32 tokens. The break-even batch is where the line crosses the API's.
Where no measured batch is as cheap as the API (a setup measured at batch 1 only, say), the break-even says
"not reached" and its `note` tells how far the largest measured batch is from the API's price."""),
    code("""\
node = tk.CloudNode(dollars_per_hour=10.0)
table = tk.cost_by_batch(recorded, node, api_dollars_per_1k=0.02, model="glm-130b shape, 12 layers (random)")
print(tk.break_even_by_setup(table, node, api_dollars_per_1k=0.02).to_string(index=False))
table[["card", "precision", "gpus", "batch", "tokens_per_s", "dollars_per_1m", "self_over_api"]]"""),
    md("""\
## Your own measurement

`glmkit bench` measures this machine: decode milliseconds per step at each batch size, through the same
generation path the cluster uses, on random weights of the config's architecture. On the CPU demo model the
numbers are tiny-model numbers; on a GPU node set the config cell to `glm-130b` with `LAYERS = 12` (a slice
of the model that fits one GPU: per-layer cost scales, so 70 layers cost about 70/12 as much per step)."""),
    code("""\
from glmkit.lab.bench import BenchOptions, default_device, resolve_config, run_bench

device = default_device()  # the first GPU when there is one
name, config, _ = resolve_config(CONFIG, LAYERS)
result = run_bench(BenchOptions(config=config, config_name=name, dtype="fp32" if device == "cpu" else "fp16",
                                device=device, batches=BATCHES, prompt_tokens=16, new_tokens=8, repeats=1))
measured = pd.DataFrame([{"card": result["device"], "gpus": 1, "model": name, "precision": result["dtype"],
                          "batch": b["batch"], "ms_per_token": b["ms_per_token"], "tokens_per_s": b["tokens_per_s"]}
                         for b in result["batches"]])
tk.cost_table(measured, tk.CloudNode(dollars_per_hour=1.0), api_dollars_per_1k=0.02)"""),
    md("""\
## Export

Every table here is a pandas DataFrame: `to_csv` it for a spreadsheet."""),
    code("""\
out = Path(tempfile.mkdtemp()) / "cost_by_batch.csv"
print("wrote", calculator.to_csv(out), "with", len(calculator.table), "rows")"""),
]
