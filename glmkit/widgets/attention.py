"""AttentionView: one layer's attention probabilities as a heatmap, per head, with the GLM mask shown."""
from __future__ import annotations

import io
import warnings
from collections.abc import Mapping

import ipywidgets as w
import numpy as np

from ._base import Tool, info_html, labelled
from .heatmap import token_text
from .render import esc

MEAN = "mean"
MASKED_COLOUR = "#d1d5db"
LEGEND = ("Rows: the query position (who looks); columns: the key position (what it looks at). Grey, hatched: "
          "masked, the query may not see that key (GLM: the context sees itself both ways, and from "
          "<code>sop</code> on each token sees only what comes before it). Each row sums to 1 over its "
          "unmasked cells.")
TOP_KEYS = 5
# Token labels are drawn in the first of these fonts that has the glyph (matplotlib's per-glyph fallback), so
# GLM-130B's Chinese tokens show where a CJK font is installed; without one they are boxes in the picture, and the
# readout under it (HTML) still shows them.
LABEL_FONTS = ("DejaVu Sans", "Noto Sans CJK SC", "Noto Sans SC", "WenQuanYi Zen Hei", "Droid Sans Fallback",
               "AR PL UMing CN")


def label_fonts() -> list[str]:
    """The installed fonts of LABEL_FONTS, in order (asking for a missing family makes matplotlib warn)."""
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    return [name for name in LABEL_FONTS if name in installed] or ["sans-serif"]


def _as_array(value, name: str) -> np.ndarray:
    """A numpy array from an array-like or a torch tensor (read through its own methods, so no torch import)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        value = (value.float() if value.is_floating_point() else value).numpy()  # numpy has no bf16
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be an array, got {type(value).__name__}: {error}") from None


def check_attention(attention, tokens, mask) -> tuple[dict[int, np.ndarray], list[str], np.ndarray]:
    """Per-layer (heads, s, t) float arrays, the t token labels and the (s, t) bool mask, checked.

    `attention` is one layer's (heads, s, t) array (shown as layer 0), a (layers, heads, s, t) array, or a
    mapping layer -> (heads, s, t). Errors name the parameter and the shape expected.
    """
    if isinstance(attention, Mapping):
        if not attention:
            raise ValueError("attention is an empty mapping: give at least one layer's (heads, s, t) array")
        layers = {}
        for layer, value in attention.items():
            if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool) or layer < 0:
                raise ValueError(f"attention's keys must be layer numbers (ints from 0), got {layer!r}")
            layers[int(layer)] = _as_array(value, f"attention[{layer}]")
    else:
        array = _as_array(attention, "attention")
        if array.ndim == 3:
            layers = {0: array}
        elif array.ndim == 4:
            layers = {i: array[i] for i in range(array.shape[0])}
        else:
            raise ValueError(f"attention must be (heads, s, t) for one layer or (layers, heads, s, t), "
                             f"got shape {array.shape}")
    shapes = {layer: a.shape for layer, a in layers.items()}
    first = next(iter(shapes.values()))
    for layer, shape in shapes.items():
        if len(shape) != 3 or shape != first or 0 in shape:
            raise ValueError(f"attention[{layer}] has shape {shape}; every layer must be the same non-empty "
                             f"(heads, s, t), here {first}")
        if not np.issubdtype(layers[layer].dtype, np.number):
            raise ValueError(f"attention[{layer}] must hold numbers, got dtype {layers[layer].dtype}")
    _, s, t = first
    if isinstance(tokens, str) or not hasattr(tokens, "__len__"):
        raise TypeError(f"tokens must be a list of the {t} token texts, got {type(tokens).__name__}")
    tokens = [str(x) for x in tokens]
    if len(tokens) != t:
        raise ValueError(f"tokens holds {len(tokens)} labels but attention has {t} key positions")
    mask = _as_array(mask, "mask")
    while mask.ndim > 2 and mask.shape[0] == 1:  # the model's (1, 1, s, t) mask
        mask = mask[0]
    if mask.shape != (s, t):
        raise ValueError(f"mask must be the (s, t) = ({s}, {t}) bool mask of allowed query-key pairs, "
                         f"got shape {mask.shape}")
    if mask.dtype != bool:
        raise ValueError(f"mask must be bool (True: the query may attend to the key), got dtype {mask.dtype}")
    return {layer: layers[layer].astype(np.float32) for layer in sorted(layers)}, tokens, mask


def check_queries(queries, s: int, t: int) -> list[int]:
    """The key position of each of the s query rows: `queries` checked, or the last s of the t positions."""
    if queries is None:
        if s > t:
            raise ValueError(f"attention has {s} queries but {t} keys: pass queries= (the key position of each "
                             f"query row), or give the attention of queries that are among the keys")
        return list(range(t - s, t))
    queries = [int(q) for q in _as_array(queries, "queries").reshape(-1)]
    if len(queries) != s or not all(0 <= q < t for q in queries):
        raise ValueError(f"queries must give the position (0..{t - 1}) of each of the {s} query rows, "
                         f"got {queries}")
    return queries


def masked_runs(mask: np.ndarray) -> list[tuple[int, int, int]]:
    """The masked cells of an (s, t) mask as row runs (row, first key, count): a GLM mask's masked cells
    are one run per query row, so the hatching is a handful of rectangles, not one per cell."""
    runs = []
    for row, allowed in enumerate(mask):
        start = None
        for key, ok in enumerate(list(allowed) + [True]):
            if not ok and start is None:
                start = key
            elif ok and start is not None:
                runs.append((row, start, key - start))
                start = None
    return runs


def attention_figure(matrix: np.ndarray, mask: np.ndarray, query_labels: list[str], key_labels: list[str],
                     title: str = "", vmax: float | None = None):
    """A matplotlib Figure of an (s, t) attention matrix: masked cells grey and hatched, tokens on both axes."""
    from matplotlib.figure import Figure

    s, t = matrix.shape
    cell = 0.28 if max(s, t) <= 40 else 0.16
    figure = Figure(figsize=(min(14.0, max(4.5, 1.6 + cell * t)), min(14.0, max(3.5, 1.2 + cell * s))), dpi=100)
    axes = figure.add_subplot()
    shown = np.ma.masked_where(~mask, matrix)
    allowed = matrix[mask]
    top = vmax if vmax is not None else (float(allowed.max()) if allowed.size and allowed.max() > 0 else 1.0)
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad=MASKED_COLOUR)
    image = axes.imshow(shown, cmap=cmap, vmin=0.0, vmax=top, interpolation="nearest", aspect="auto")
    from matplotlib.patches import Rectangle

    for row, first, count in masked_runs(mask):
        axes.add_patch(Rectangle((first - 0.5, row - 0.5), count, 1, fill=False, hatch="///",
                                 edgecolor="#6b7280", linewidth=0, gid="masked"))
    size, fonts = (8 if max(s, t) <= 40 else 6), label_fonts()
    axes.set_xticks(range(t), [token_text(x) for x in key_labels], rotation=90, fontsize=size, fontfamily=fonts)
    axes.set_yticks(range(s), [token_text(x) for x in query_labels], fontsize=size, fontfamily=fonts)
    axes.set_xlabel("key (attended to)")
    axes.set_ylabel("query")
    if title:
        axes.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axes, fraction=0.04, pad=0.02, label="attention probability")
    return figure


def figure_png(figure) -> bytes:
    """A Figure as PNG bytes (Agg, no pyplot: nothing global keeps the figure alive)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # a token no installed font can draw is a box, not a warning per redraw
        warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
        figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


class AttentionView(Tool):
    """Attention probabilities of a layer (selectable) and a head (or their mean) as a heatmap over the
    prompt's tokens; masked query-key pairs are grey and hatched, so "not allowed" never reads as "zero"."""

    def __init__(self, attention, tokens, mask, layer: int | None = None, head: int | str = MEAN,
                 queries=None):
        super().__init__()
        self.attention, self.tokens, self.mask = check_attention(attention, tokens, mask)
        heads, s, t = next(iter(self.attention.values())).shape
        self.queries = check_queries(queries, s, t)
        self.query_tokens = [self.tokens[q] for q in self.queries]
        layers = list(self.attention)
        if layer is None:
            layer = layers[-1]
        if layer not in self.attention:
            raise ValueError(f"layer {layer!r} is not among the attention's layers {layers}")
        if head != MEAN and (not isinstance(head, int) or isinstance(head, bool) or not 0 <= head < heads):
            raise ValueError(f"head must be {MEAN!r} or a head number 0..{heads - 1}, got {head!r}")
        self.layer = w.SelectionSlider(options=layers, value=layer, continuous_update=False,
                                       layout=w.Layout(width="50%"))
        self.head = w.Dropdown(options=[("mean of the heads", MEAN)] + [(f"head {h}", h) for h in range(heads)],
                               value=head, layout=w.Layout(width="19em"))
        self.full_scale = w.Checkbox(False, description="colour scale 0–1 (else 0 to the largest value)",
                                     indent=False, layout=w.Layout(width="auto"))
        self.image = w.Image(format="png", layout=w.Layout(max_width="100%"))
        self.image.add_class("glmkit-attention")
        self.readout = w.HTML()
        self.answer_views = [self.readout]
        update = self._guarded(lambda _: self.refresh())
        for widget in (self.layer, self.head, self.full_scale):
            widget.observe(update, "value")
        self.layer.layout.display = None if len(layers) > 1 else "none"
        legend = w.HTML(f'<div style="font-size:90%;color:#555">{LEGEND}</div>')
        self._finish([labelled(self.layer, "layer", width="4em"),
                      w.HBox([labelled(self.head, "head", width="4em"), self.full_scale]),
                      self.image, self.readout, legend])
        self.refresh()

    @classmethod
    def from_trace(cls, trace, layer: int | None = None, head: int | str = MEAN) -> "AttentionView":
        """The attention probabilities of a glmkit `Trace` that read the `attention_probs` site."""
        values = getattr(trace, "values", None)
        if not isinstance(values, dict) or "attention_probs" not in values:
            raise ValueError("trace holds no attention probabilities: make it with "
                             "backend.trace(prompt, sites='attention_probs')")
        probs = values["attention_probs"]  # (layers, heads, positions, n)
        layers = trace.layers["attention_probs"]
        queries = list(trace.positions)
        mask = _as_array(trace.allowed, "trace.allowed")[queries]  # (positions, n)
        return cls({layer_id: probs[i] for i, layer_id in enumerate(layers)}, trace.tokens, mask, layer=layer,
                   head=head, queries=queries)

    @classmethod
    def from_backend(cls, backend, prompt: str, *, layer: int | None = None, head: int | str = MEAN,
                     **trace_options) -> "AttentionView":
        """Trace `prompt`'s attention probabilities on `backend` (a GLMPipeline or a GLMCluster) and show them;
        `trace_options` go to `backend.trace` (layers=, positions=, max_new_tokens=)."""
        if not hasattr(backend, "trace"):
            raise TypeError(f"backend must be a GLMPipeline or a GLMCluster (with .trace), "
                            f"got {type(backend).__name__}")
        return cls.from_trace(backend.trace(prompt, sites="attention_probs", **trace_options), layer, head)

    def matrix(self) -> np.ndarray:
        """The (s, t) probabilities shown: the selected head's, or the mean over heads."""
        probs = self.attention[self.layer.value]  # (heads, s, t)
        return probs.mean(axis=0) if self.head.value == MEAN else probs[self.head.value]

    def title(self) -> str:
        head = "mean of the heads" if self.head.value == MEAN else f"head {self.head.value}"
        return f"layer {self.layer.value}, {head}"

    def figure(self):
        """The heatmap as a matplotlib Figure (what the image shows)."""
        return attention_figure(self.matrix(), self.mask, self.query_tokens, self.tokens, self.title(),
                                vmax=1.0 if self.full_scale.value else None)

    def top_keys(self, query: int = -1, k: int = TOP_KEYS) -> list[tuple[int, str, float]]:
        """The k keys that query row `query` attends to most, as (position, token, probability), masked keys
        left out."""
        row, allowed = self.matrix()[query], self.mask[query]
        order = [j for j in np.argsort(-row, kind="stable") if allowed[j]][:k]
        return [(int(j), self.tokens[j], float(row[j])) for j in order]

    def refresh(self) -> None:
        """Redraw the heatmap and the readout for the selected layer and head."""
        self.image.value = figure_png(self.figure())
        keys = " · ".join(f"{esc(token_text(token))} ({position}) {p:.2f}" for position, token, p in self.top_keys())
        last = esc(token_text(self.query_tokens[-1]))
        self.readout.value = (f'<div style="font-size:90%">the last query, position {self.queries[-1]} ({last}), '
                              f"attends most to: {keys}</div>")
        self.status.value = info_html(f"{self.title()}: {self.mask.sum()} of {self.mask.size} query-key pairs "
                                      f"allowed by the mask")
