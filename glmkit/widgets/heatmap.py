"""HTML heatmap tables for the inside-the-model widgets: checked input frames, colour scales, token labels.

Plain functions of their inputs (no widgets). A grid is layers (rows, the last layer on top, as the residual
stream reads upwards) by token positions (columns, headed by the input token); every cell carries its
numbers in `data-*` attributes and a hover `title`, and all model text is escaped.
"""
from __future__ import annotations

import math

import pandas as pd

from .render import MONO, esc

CELL_WIDTH_EM = 5.5
_EMPTY_CELL = "background:#f3f4f6;color:#9ca3af"


def check_frame(frame, name: str, columns: list[str], numeric: tuple[str, ...] = ()) -> pd.DataFrame:
    """`frame` if it is a non-empty DataFrame holding `columns` (those in `numeric` numbers); else an error
    naming the parameter `name` and what is missing."""
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{name} must be a pandas DataFrame with columns {columns}, got {type(frame).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} lacks the columns {missing}: it needs {columns} "
                         f"(it has {list(frame.columns)})")
    if frame.empty:
        raise ValueError(f"{name} has no rows: compute it for at least one layer and position")
    for column in ("layer", "position") + tuple(numeric):
        if column in columns and not pd.api.types.is_numeric_dtype(frame[column]):
            raise ValueError(f"{name}[{column!r}] must hold numbers, got dtype {frame[column].dtype}")
    for column in ("layer", "position"):
        if column in columns and ((frame[column] < 0).any() or (frame[column] % 1 != 0).any()):
            raise ValueError(f"{name}[{column!r}] must hold whole numbers from 0, got "
                             f"{sorted(set(frame[column].tolist()))[:5]}")
    return frame


def token_text(text) -> str:
    """A token as readable one-line text: newline ↵, tab →, space ▁; '∅' for an empty token (plain text)."""
    text = "" if text is None or (isinstance(text, float) and math.isnan(text)) else str(text)
    if not text:
        return "∅"
    return text.replace("\n", "↵").replace("\t", "→").replace(" ", "▁")


def probability_background(p: float) -> str:
    """Background for a probability: white (0) through to a mid blue (1), light enough for dark text."""
    if p is None or not math.isfinite(p):
        return "#f3f4f6"
    p = min(1.0, max(0.0, float(p)))
    return f"hsl(212, 85%, {round(98 - 42 * p)}%)"


def diverging_background(value: float, scale: float) -> str:
    """Background for a signed value: blue below zero, red above, white at 0, full colour at ±`scale`."""
    if value is None or not math.isfinite(value):
        return "#f3f4f6"
    strength = min(1.0, abs(value) / scale) if scale > 0 else 0.0
    hue = 6 if value > 0 else 218
    return f"hsl({hue}, 80%, {round(98 - 42 * strength)}%)"


def position_labels(frame: pd.DataFrame, tokens: list[str] | None = None) -> dict[int, str]:
    """Position -> its input token's text: from `tokens` (the whole prompt) or the frame's `input_token`."""
    if tokens is not None:
        return {i: str(t) for i, t in enumerate(tokens)}
    if "input_token" not in frame.columns:
        return {}
    firsts = frame.drop_duplicates("position")
    return dict(zip(firsts["position"].astype(int), firsts["input_token"].astype(str)))


def grid_html(layers: list[int], positions: list[int], labels: dict[int, str], cell, css_class: str) -> str:
    """A layers x positions table; `cell(layer, position)` gives (text, style, title, data attrs) or None
    for an empty cell. The last layer is the top row."""
    head = ['<th style="padding:2px 6px;text-align:right">layer \\ position</th>']
    for position in positions:
        label = token_text(labels.get(position, ""))
        title = esc(f"position {position}: {label}")
        head.append(f'<th class="{css_class}-position" data-position="{position}" title="{title}" '
                    f'style="padding:2px 4px;font-weight:normal;max-width:{CELL_WIDTH_EM}em;overflow:hidden;'
                    f'text-overflow:ellipsis;white-space:pre">{esc(label)}<br>'
                    f'<span style="color:#6b7280;font-size:85%">{position}</span></th>')
    rows = []
    for layer in sorted(layers, reverse=True):
        cells = [f'<th style="padding:2px 6px;text-align:right;font-weight:normal">{layer}</th>']
        for position in positions:
            content = cell(layer, position)
            if content is None:
                cells.append(f'<td style="{_EMPTY_CELL};text-align:center" title="not computed">·</td>')
                continue
            text, style, title, data = content
            attrs = "".join(f' data-{key}="{esc(str(value))}"' for key, value in data.items())
            cells.append(f'<td class="{css_class}-cell" data-layer="{layer}" data-position="{position}"{attrs} '
                         f'style="{style};padding:2px 4px;max-width:{CELL_WIDTH_EM}em;overflow:hidden;'
                         f'text-overflow:ellipsis;white-space:pre;border:1px solid #fff" '
                         f'title="{esc(title)}">{esc(text)}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<div style="overflow-x:auto;max-width:100%"><table class="{css_class}" '
            f'style="{MONO};font-size:85%;border-collapse:collapse">'
            f"<thead><tr>{''.join(head)}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")
