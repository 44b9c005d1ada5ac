"""TokenomicsCalculator: what a million tokens cost on your node, against an API's price, by batch size."""
from __future__ import annotations

import html
from pathlib import Path

import ipywidgets as w
import pandas as pd

from .. import tokenomics as tk
from ._base import Tool, info_html, labelled


class TokenomicsCalculator(Tool):
    """Widgets for the node's cost (cloud or owned) and the API's price over a table of measured throughput."""

    def __init__(self, throughput: pd.DataFrame | None = None, model: str | None = None,
                 dollars_per_hour: float = 10.0, api_dollars_per_1k: float = 0.02):
        super().__init__()
        self.throughput = tk.read_benchmarks() if throughput is None else throughput
        models = sorted(set(self.throughput["model"]))
        self.model = w.Dropdown(options=models, value=model if model in models else models[0])
        self.kind = w.ToggleButtons(options=["cloud", "owned"], value="cloud")
        self.dollars_per_hour = w.BoundedFloatText(value=dollars_per_hour, min=0.01, max=1e6, step=0.5)
        self.purchase = w.BoundedFloatText(value=200_000.0, min=1.0, max=1e9, step=1000)
        self.years = w.BoundedFloatText(value=3.0, min=0.1, max=20, step=0.5)
        self.utilisation = w.BoundedFloatText(value=0.5, min=0.01, max=1.0, step=0.05)
        self.api_price = w.BoundedFloatText(value=api_dollars_per_1k, min=1e-6, max=100, step=0.001)
        self.table_view = w.HTML()
        self.plot = w.Output()
        self.table: pd.DataFrame | None = None
        self.break_even: pd.DataFrame | None = None
        controls = [labelled(self.model, "measurements"), labelled(self.kind, "node"),
                    labelled(self.dollars_per_hour, "cloud $/hour"), labelled(self.purchase, "purchase $"),
                    labelled(self.years, "amortisation years"), labelled(self.utilisation, "utilisation"),
                    labelled(self.api_price, "API $ per 1K tokens")]
        for widget in (self.model, self.kind, self.dollars_per_hour, self.purchase, self.years,
                       self.utilisation, self.api_price):
            widget.observe(self._guarded(lambda change: self.update()), names="value")
        self.kind.observe(lambda change: self._enable_inputs(), names="value")
        self._finish([w.VBox(controls), self.table_view, self.plot])
        self._enable_inputs()
        self._guarded(self.update)()

    def _enable_inputs(self) -> None:
        # A rented node is priced by the hour, an owned one by its purchase spread over busy hours: grey out
        # the inputs the chosen kind does not use, so no one edits a number that changes nothing.
        cloud = self.kind.value == "cloud"
        self.dollars_per_hour.disabled = not cloud
        for widget in (self.purchase, self.years, self.utilisation):
            widget.disabled = cloud

    def node(self) -> tk.CloudNode | tk.OwnedNode:
        """The node described by the current inputs."""
        if self.kind.value == "cloud":
            return tk.CloudNode(self.dollars_per_hour.value)
        return tk.OwnedNode(self.purchase.value, self.years.value, self.utilisation.value)

    def update(self) -> None:
        """Recompute the cost table, the break-even batches and the plot from the inputs."""
        node, api = self.node(), self.api_price.value
        self.table = tk.cost_by_batch(self.throughput, node, api, self.model.value)
        self.break_even = tk.break_even_by_setup(self.table, node, api)
        shown = self.table[tk.setup_columns(self.table) + ["batch", "tokens_per_s", "dollars_per_1m",
                                                           "api_dollars_per_1m", "self_over_api"]]
        self.table_view.value = shown.to_html(index=False, float_format=lambda v: f"{v:,.4g}") + \
            self.break_even.to_html(index=False, na_rep="not reached", float_format=lambda v: f"{v:,.3g}")
        self.status.value = info_html(f"node costs ${node.cost_per_busy_hour():,.2f} per busy hour; "
                                      f"API ${tk.api_dollars_per_million(api):,.2f} per 1M tokens")
        self.plot.clear_output(wait=True)
        with self.plot:
            import matplotlib.pyplot as plt
            from IPython.display import display

            figure = tk.plot_cost_by_batch(self.table, api, title=html.escape(self.model.value))
            display(figure)
            plt.close(figure)  # displayed once as an image; pyplot must not keep it alive

    def to_csv(self, path: str | Path) -> Path:
        """Write the current cost table as CSV."""
        path = Path(path)
        self.table.to_csv(path, index=False)
        return path
