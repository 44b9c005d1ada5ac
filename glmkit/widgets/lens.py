"""LogitLensGrid: what each layer would predict at each position, as a layers x positions table."""
from __future__ import annotations

import ipywidgets as w
import pandas as pd

from ._base import Tool, info_html, labelled
from .heatmap import check_frame, grid_html, position_labels, probability_background, token_text

TOP_COLUMNS = ["layer", "position", "input_token", "rank", "token_id", "token", "prob"]
TARGET_COLUMNS = ["layer", "position", "token_id", "token", "prob", "rank"]
VIEWS = ("top token", "target probability", "target rank")
MAX_POSITIONS_SHOWN = 40  # a longer prompt opens on its last 40 positions (the slider shows the rest)
LEGEND = ("Each cell is the token the residual stream after that block would predict (through the final "
          "LayerNorm and the output embedding); the top row is the model's own output. Colour: its "
          "probability. Hover a cell for the top tokens with their probabilities.")


def check_lens(lens) -> tuple[pd.DataFrame, pd.DataFrame | None, list[str] | None]:
    """The `.top`, `.target` and `.tokens` of a LogitLens, checked; errors name `lens` and what to change."""
    if not hasattr(lens, "top"):
        raise TypeError(f"lens must be a LogitLens (an object with .top, a DataFrame with columns "
                        f"{TOP_COLUMNS}), got {type(lens).__name__}")
    top = check_frame(lens.top, "lens.top", TOP_COLUMNS, numeric=("rank", "prob"))
    target = getattr(lens, "target", None)
    if target is not None:
        target = check_frame(target, "lens.target", TARGET_COLUMNS, numeric=("rank", "prob"))
    tokens = getattr(lens, "tokens", None)
    if tokens is not None:
        tokens = [str(t) for t in tokens]
        if int(top["position"].max()) >= len(tokens):
            raise ValueError(f"lens.top has position {int(top['position'].max())} but lens.tokens holds "
                             f"only {len(tokens)} tokens")
    return top, target, tokens


def _top_lists(top: pd.DataFrame) -> dict[tuple[int, int], list[tuple[int, str, float]]]:
    """(layer, position) -> [(rank, token, prob), ...] by rank."""
    ordered = top.sort_values(["layer", "position", "rank"])
    cells: dict[tuple[int, int], list[tuple[int, str, float]]] = {}
    for layer, position, rank, token, prob in zip(ordered["layer"], ordered["position"], ordered["rank"],
                                                  ordered["token"], ordered["prob"]):
        cells.setdefault((int(layer), int(position)), []).append((int(rank), str(token), float(prob)))
    return cells


def _target_rows(target: pd.DataFrame | None) -> dict[tuple[int, int], list[dict]]:
    """(layer, position) -> the target rows there (token_id, token, prob, rank)."""
    rows: dict[tuple[int, int], list[dict]] = {}
    if target is None:
        return rows
    for layer, position, token_id, token, prob, rank in zip(target["layer"], target["position"],
                                                            target["token_id"], target["token"],
                                                            target["prob"], target["rank"]):
        rows.setdefault((int(layer), int(position)), []).append(
            {"token_id": int(token_id), "token": str(token), "prob": float(prob), "rank": int(rank)})
    return rows


def _top_title(layer: int, position: int, label: str, entries: list[tuple[int, str, float]]) -> str:
    lines = [f"layer {layer}, position {position} (input {token_text(label)})"]
    lines += [f"{rank:>2}. {token_text(token)}  p = {prob:.3f}" for rank, token, prob in entries]
    return "\n".join(lines)


class LogitLensGrid(Tool):
    """A logit lens (glmkit's probe `LogitLens`, or anything with its `.top` / `.target` / `.tokens`) as a
    table of layers x positions: each cell the layer's top token, coloured by its probability, the top k
    on hover; with a target, views of the target token's probability or rank instead."""

    def __init__(self, lens, view: str = "top token", positions: tuple[int, int] | None = None):
        super().__init__()
        self.top, self.target, self.tokens = check_lens(lens)
        views = VIEWS if self.target is not None else VIEWS[:1]
        if view not in views:
            raise ValueError(f"view must be one of {list(views)}, got {view!r}"
                             + ("" if self.target is not None else " (this lens has no target token)"))
        self._cells = _top_lists(self.top)
        self._targets = _target_rows(self.target)
        self.layers = sorted({layer for layer, _ in self._cells})
        self.all_positions = sorted({position for _, position in self._cells})
        self.labels = position_labels(self.top, self.tokens)
        self.view = w.ToggleButtons(options=list(views), value=view)
        self.view.style.button_width = "11em"
        self.target_token = w.Dropdown(options=self._target_options(), layout=w.Layout(width="auto"))
        low, high = self.all_positions[0], self.all_positions[-1]
        if positions is None:
            positions = (max(low, high - MAX_POSITIONS_SHOWN + 1), high)
        positions = self._check_positions(positions, low, high)
        self.position_range = w.IntRangeSlider(value=positions, min=low, max=max(high, low + 1),
                                               continuous_update=False, layout=w.Layout(width="60%"))
        self.grid = w.HTML()
        self.legend = w.HTML(f'<div style="font-size:90%;color:#555">{LEGEND}</div>')
        update = self._guarded(lambda _: self.refresh())
        for widget in (self.view, self.target_token, self.position_range):
            widget.observe(update, "value")
        self.view.tooltip = "what each cell shows: the layer's top token, or the target token's probability or rank"
        controls = [self.view,  # the button texts say what they show: a description sat above them in JupyterLab
                    labelled(self.target_token, "target", width="5em"),
                    labelled(self.position_range, "positions", width="5em")]
        self.target_token.layout.display = None if len(self.target_token.options) > 1 else "none"
        self.view.layout.display = None if self.target is not None else "none"
        self.position_range.layout.display = None if len(self.all_positions) > 1 else "none"
        self._finish(controls + [self.grid, self.legend])
        self.refresh()

    @classmethod
    def from_backend(cls, backend, prompt: str, *, view: str = "top token", positions: tuple[int, int] | None = None,
                     **lens_options) -> "LogitLensGrid":
        """Compute `backend.logit_lens(prompt, **lens_options)` (a GLMPipeline or a GLMCluster) and show it."""
        if not hasattr(backend, "logit_lens"):
            raise TypeError(f"backend must be a GLMPipeline or a GLMCluster (with .logit_lens), "
                            f"got {type(backend).__name__}")
        return cls(backend.logit_lens(prompt, **lens_options), view=view, positions=positions)

    @staticmethod
    def _check_positions(positions, low: int, high: int) -> tuple[int, int]:
        if (not isinstance(positions, (tuple, list)) or len(positions) != 2
                or not all(isinstance(p, int) for p in positions) or not low <= positions[0] <= positions[1] <= high):
            raise ValueError(f"positions must be a (first, last) pair of positions within {low}..{high}, "
                             f"got {positions!r}")
        return int(positions[0]), int(positions[1])

    def _target_options(self) -> list[tuple[str, int]]:
        """One option per target token id when the target frame holds several per cell; else one (all)."""
        if self.target is None:
            return [("(none)", -1)]
        per_cell = self.target.groupby(["layer", "position"]).size()
        if per_cell.max() <= 1:
            return [("(per position)", -1)]
        ids = self.target.drop_duplicates("token_id")
        return [(f"{token_text(t)} (id {int(i)})", int(i)) for i, t in zip(ids["token_id"], ids["token"])]

    @property
    def positions(self) -> list[int]:
        """The positions shown (the slider's range)."""
        low, high = self.position_range.value
        return [p for p in self.all_positions if low <= p <= high]

    def _target_row(self, layer: int, position: int) -> dict | None:
        rows = self._targets.get((layer, position), [])
        if self.target_token.value != -1:
            rows = [row for row in rows if row["token_id"] == self.target_token.value]
        return rows[0] if rows else None

    def cell(self, layer: int, position: int) -> dict | None:
        """What the grid shows at (layer, position) in the current view: text, prob, title (None if empty)."""
        entries = self._cells.get((layer, position))
        if entries is None:
            return None
        title = _top_title(layer, position, self.labels.get(position, ""), entries)
        rank, token, prob = entries[0]
        if self.view.value == "top token":
            return {"text": token_text(token), "prob": prob, "rank": rank, "token": token, "title": title}
        target = self._target_row(layer, position)
        if target is None:
            return None
        title = (f"target {token_text(target['token'])}: p = {target['prob']:.3f}, rank {target['rank']}\n"
                 + title)
        text = f"{target['prob']:.2f}" if self.view.value == "target probability" else f"#{target['rank']}"
        return {"text": text, "prob": target["prob"], "rank": target["rank"], "token": target["token"],
                "title": title}

    def table(self) -> pd.DataFrame:
        """The shown cells' texts as a DataFrame: one row per layer (last layer first), one column per position."""
        positions = self.positions
        rows = {layer: [(c or {}).get("text") for c in (self.cell(layer, p) for p in positions)]
                for layer in sorted(self.layers, reverse=True)}
        frame = pd.DataFrame.from_dict(rows, orient="index", columns=positions)
        frame.index.name, frame.columns.name = "layer", "position"
        return frame

    def refresh(self) -> None:
        """Re-render the grid for the current view, target token and positions."""
        def render(layer: int, position: int):
            shown = self.cell(layer, position)
            if shown is None:
                return None
            style = f"background:{probability_background(shown['prob'])}"
            return shown["text"], style, shown["title"], {"prob": f"{shown['prob']:.6g}", "rank": shown["rank"]}

        positions = self.positions
        self.grid.value = grid_html(self.layers, positions, self.labels, render, "glmkit-lens")
        self.status.value = info_html(f"{len(self.layers)} layers × {len(positions)} positions "
                                      f"(of {len(self.all_positions)}); view: {self.view.value}")

    def first_layer(self, position: int, token: str | None = None, token_id: int | None = None) -> int | None:
        """The lowest layer from which `token` (text) or `token_id` is the top token at `position` in every
        layer above; None if the top layer does not predict it."""
        if (token is None) == (token_id is None):
            raise ValueError("first_layer needs exactly one of token= (its text) or token_id=")
        column, wanted = ("token", str(token)) if token is not None else ("token_id", int(token_id))
        firsts = self.top[(self.top["position"] == position) & (self.top["rank"] == 1)]
        if firsts.empty:
            raise ValueError(f"position {position} is not in the lens (it has {self.all_positions[0]}.."
                             f"{self.all_positions[-1]})")
        hits = dict(zip(firsts["layer"].astype(int), firsts[column] == wanted))
        found = None
        for layer in sorted(hits, reverse=True):
            if not hits[layer]:
                break
            found = layer
        return found
