"""PatchingHeatmap: the effect of patching each (layer, position) activation, per site, as a heatmap table."""
from __future__ import annotations

import math

import ipywidgets as w
import pandas as pd

from ._base import Tool, info_html, labelled
from .heatmap import check_frame, diverging_background, grid_html, position_labels, token_text

COLUMNS = ["site", "layer", "position", "input_token", "logprob_change", "clean_logprob", "corrupted_logprob",
           "patched_logprob"]
NUMBERS = ("logprob_change", "clean_logprob", "corrupted_logprob", "patched_logprob")
LEGEND = ("Each cell: the change in the answer's log probability when that site's activation at that layer "
          "and position is patched in (red: up, blue: down, white: no change; the colour is full at the "
          "largest change shown). Hover a cell for the clean, corrupted and patched log probabilities.")


def check_patching(results) -> pd.DataFrame:
    """The patching results frame, checked: its columns, numbers, and one row per (site, layer, position)."""
    frame = check_frame(results, "results", COLUMNS, numeric=NUMBERS)
    repeated = frame.duplicated(["site", "layer", "position"])
    if repeated.any():
        row = frame[repeated].iloc[0]
        raise ValueError(f"results has more than one row for site {row['site']!r}, layer {row['layer']}, "
                         f"position {row['position']}: give one row per (site, layer, position)")
    return frame


class PatchingHeatmap(Tool):
    """Activation-patching results (glmkit's probe patching frame) as layers x positions, one site at a time."""

    def __init__(self, results: pd.DataFrame, site: str | None = None, scale: float | None = None):
        super().__init__()
        self.results = check_patching(results)
        sites = list(dict.fromkeys(str(s) for s in self.results["site"]))
        self._by_site = {site: rows for site, rows in self.results.groupby(self.results["site"].astype(str),
                                                                          sort=False)}
        if site is None:
            site = sites[0]
        if site not in sites:
            raise ValueError(f"site must be one of {sites}, got {site!r}")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale) or scale <= 0):
            raise ValueError(f"scale must be a positive number (the |change| drawn at full colour) or None "
                             f"for the largest shown, got {scale!r}")
        self.scale = scale
        self.site = w.Dropdown(options=sites, value=site, layout=w.Layout(width="auto"))
        self.labels = position_labels(self.results)
        self.grid = w.HTML()
        self.site.observe(self._guarded(lambda _: self.refresh()), "value")
        self.site.layout.display = None if len(sites) > 1 else "none"
        legend = w.HTML(f'<div style="font-size:90%;color:#555">{LEGEND}</div>')
        self._finish([labelled(self.site, "site", width="4em"), self.grid, legend])
        self.refresh()

    @classmethod
    def from_backend(cls, backend, clean: str, corrupted: str, target, *, site: str | None = None,
                     scale: float | None = None, **patch_options) -> "PatchingHeatmap":
        """Run `backend.patch(clean, corrupted, target, **patch_options)` (a GLMPipeline or a GLMCluster) and
        show the sweep."""
        if not hasattr(backend, "patch"):
            raise TypeError(f"backend must be a GLMPipeline or a GLMCluster (with .patch), "
                            f"got {type(backend).__name__}")
        return cls(backend.patch(clean, corrupted, target, **patch_options), site=site, scale=scale)

    def rows(self) -> pd.DataFrame:
        """The results of the selected site."""
        return self._by_site[self.site.value]

    def matrix(self) -> pd.DataFrame:
        """logprob_change of the selected site: one row per layer (last first), one column per position."""
        frame = self.rows().pivot(index="layer", columns="position", values="logprob_change")
        return frame.sort_index(ascending=False)

    def strongest(self) -> dict:
        """The (layer, position) whose patch changes the log probability most, with its row's numbers."""
        rows = self.rows().dropna(subset=["logprob_change"])
        if rows.empty:
            raise ValueError(f"site {self.site.value!r} has no finite logprob_change")
        row = rows.loc[rows["logprob_change"].abs().idxmax()]
        return {"layer": int(row["layer"]), "position": int(row["position"]),
                "input_token": str(row["input_token"]), **{name: float(row[name]) for name in NUMBERS}}

    def refresh(self) -> None:
        """Re-render the grid for the selected site."""
        rows = self.rows()
        finite = [abs(c) for c in rows["logprob_change"] if math.isfinite(c)]
        cells = {(int(r.layer), int(r.position)): r for r in rows.itertuples(index=False)}
        scale = self.scale or (max(finite) if finite and max(finite) > 0 else 1.0)

        def render(layer: int, position: int):
            row = cells.get((layer, position))
            if row is None:
                return None
            change = float(row.logprob_change)
            text = f"{change:+.2f}" if math.isfinite(change) else "nan"
            title = (f"{self.site.value}, layer {layer}, position {position} "
                     f"(input {token_text(row.input_token)})\nchange {change:+.3f}\n"
                     f"clean {row.clean_logprob:.3f} · corrupted {row.corrupted_logprob:.3f} · "
                     f"patched {row.patched_logprob:.3f}")
            return text, f"background:{diverging_background(change, scale)}", title, {"change": f"{change:.6g}"}

        layers = sorted({layer for layer, _ in cells})
        positions = sorted({position for _, position in cells})
        self.grid.value = grid_html(layers, positions, self.labels, render, "glmkit-patching")
        if finite:
            best = self.strongest()
            self.status.value = info_html(
                f"{self.site.value}: largest change {best['logprob_change']:+.3f} at layer {best['layer']}, "
                f"position {best['position']} ({token_text(best['input_token'])}); full colour at ±{scale:.3g}")
        else:
            self.status.value = info_html(f"{self.site.value}: no finite change to show")
