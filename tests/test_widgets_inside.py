"""The inside-the-model widgets (LogitLensGrid, AttentionView, PatchingHeatmap) on hand-built data in the probe
library's data contract: what each widget shows is its own behaviour, so these frames are made here, with
known answers; the same widgets on the demo model's real probes are tested below them."""
from __future__ import annotations

import random
import re
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from glmkit.widgets import AttentionView, LogitLensGrid, PatchingHeatmap
from glmkit.widgets.attention import masked_runs
from glmkit.widgets.heatmap import token_text

TOKENS = ["def", " ", "[MASK]", "(", "self", "<sop>"]
LAYERS = 4


class Cells(HTMLParser):
    """The <td> cells of a grid: their attributes and text (entities decoded, as a browser would)."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.cells: list[dict] = []
        self._open: dict | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        if tag == "td":
            self._open = {**dict(attrs), "text": ""}
        if tag == "script":
            raise AssertionError("a <script> element made it into the grid")

    def handle_data(self, data):
        if self._open is not None:
            self._open["text"] += data

    def handle_endtag(self, tag):
        if tag == "td" and self._open is not None:
            self.cells.append(self._open)
            self._open = None

    def at(self, layer: int, position: int) -> dict:
        [cell] = [c for c in self.cells
                  if c.get("data-layer") == str(layer) and c.get("data-position") == str(position)]
        return cell


def lightness(style: str) -> int:
    return int(re.search(r"hsl\(\d+, \d+%, (\d+)%\)", style).group(1))


def lens_data(target: bool = True, tokens=TOKENS):
    """Layer l's top token at position p is f"t{l}{p}" with probability (l + 1) / 10; ranks 2 and 3 follow;
    the target token '<b>' sits at rank 1 from layer 2 up at the last position, rank 3 below."""
    rows, targets = [], []
    for layer in range(LAYERS):
        for position, token in enumerate(tokens):
            last = position == len(tokens) - 1
            first = ("<b>", 0.6) if last and layer >= 2 else (f"t{layer}{position}", (layer + 1) / 10)
            ranked = [first, ("x\n", 0.05), ("<b>" if not (last and layer >= 2) else "y", 0.01)]
            for rank, (text, prob) in enumerate(ranked, start=1):
                rows.append(dict(layer=layer, position=position, input_token=token, rank=rank,
                                 token_id=100 * layer + 10 * position + rank, token=text, prob=prob))
            rank = 1 if last and layer >= 2 else 3
            targets.append(dict(layer=layer, position=position, token_id=7, token="<b>",
                                prob=0.6 if rank == 1 else 0.01, rank=rank))
    return SimpleNamespace(top=pd.DataFrame(rows), target=pd.DataFrame(targets) if target else None,
                           tokens=list(tokens))


# ----- LogitLensGrid --------------------------------------------------------------------------------

def test_lens_grid_cells_are_the_top_tokens_coloured_by_probability_with_the_top_k_on_hover():
    grid = LogitLensGrid(lens_data())
    cells = Cells(grid.grid.value)
    assert len(cells.cells) == LAYERS * len(TOKENS)
    cell = cells.at(1, 3)
    assert cell["text"] == "t13" and float(cell["data-prob"]) == pytest.approx(0.2)
    assert cell["title"].splitlines() == ["layer 1, position 3 (input ()", " 1. t13  p = 0.200",
                                          " 2. x↵  p = 0.050", " 3. <b>  p = 0.010"]
    # More probable, darker: layer 3 (p 0.4) over layer 0 (p 0.1) at the same position.
    assert lightness(cells.at(3, 3)["style"]) < lightness(cells.at(1, 3)["style"]) < lightness(cells.at(0, 3)["style"])
    assert "&lt;b&gt;" in grid.grid.value and "<b>" not in grid.grid.value  # model text escaped
    # The last layer is the top row, and the column heads are the input tokens.
    order = [int(c["data-layer"]) for c in cells.cells if c["data-position"] == "0"]
    assert order == [3, 2, 1, 0]
    assert list(grid.table().index) == [3, 2, 1, 0] and grid.table().loc[0, 4] == "t04"
    assert "(input ▁)" in cells.at(0, 1)["title"]  # the space token is shown, not blank


def test_lens_grid_target_views_and_the_layer_a_token_becomes_top():
    grid = LogitLensGrid(lens_data())
    assert grid.first_layer(5, token="<b>") == 2
    assert grid.first_layer(4, token="t34") == 3 and grid.first_layer(4, token="nope") is None
    grid.view.value = "target probability"
    assert grid.table().loc[3, 5] == "0.60" and grid.table().loc[1, 5] == "0.01"
    cell = Cells(grid.grid.value).at(2, 5)
    assert cell["title"].startswith("target <b>: p = 0.600, rank 1")
    grid.view.value = "target rank"
    assert list(grid.table()[5]) == ["#1", "#1", "#3", "#3"]
    assert grid.target_token.layout.display == "none"  # one target per cell: nothing to choose

    no_target = LogitLensGrid(lens_data(target=False))
    assert list(no_target.view.options) == ["top token"] and no_target.view.layout.display == "none"
    with pytest.raises(ValueError, match="view must be one of \\['top token'\\].*no target"):
        LogitLensGrid(lens_data(target=False), view="target rank")


def test_lens_grid_several_targets_get_a_chooser_and_positions_a_range():
    lens = lens_data()
    other = lens.target.assign(token_id=8, token="z", prob=0.3, rank=2)
    lens.target = pd.concat([lens.target, other], ignore_index=True)
    grid = LogitLensGrid(lens, view="target rank")
    assert [label for label, _ in grid.target_token.options] == ["<b> (id 7)", "z (id 8)"]
    assert grid.target_token.layout.display is None
    grid.target_token.value = 8
    assert set(grid.table().stack()) == {"#2"}
    grid.position_range.value = (2, 4)
    assert list(grid.table().columns) == [2, 3, 4] and len(Cells(grid.grid.value).cells) == 3 * LAYERS

    long = lens_data(tokens=[f"w{i}" for i in range(60)])
    assert LogitLensGrid(long).positions == list(range(20, 60))  # opens on the last 40 positions
    assert LogitLensGrid(long, positions=(0, 59)).positions == list(range(60))


def test_lens_grid_refuses_bad_lenses_naming_what_to_change():
    with pytest.raises(TypeError, match="lens must be a LogitLens"):
        LogitLensGrid(pd.DataFrame())
    lens = lens_data()
    lens.top = lens.top.drop(columns="prob")
    with pytest.raises(ValueError, match=r"lens.top lacks the columns \['prob'\]"):
        LogitLensGrid(lens)
    lens = lens_data()
    lens.target = lens.target.iloc[:0]
    with pytest.raises(ValueError, match="lens.target has no rows"):
        LogitLensGrid(lens)
    lens = lens_data()
    lens.top = lens.top.assign(layer=-1)
    with pytest.raises(ValueError, match=r"lens.top\['layer'\] must hold whole numbers from 0"):
        LogitLensGrid(lens)
    lens = lens_data()
    lens.tokens = TOKENS[:2]
    with pytest.raises(ValueError, match="lens.tokens holds only 2 tokens"):
        LogitLensGrid(lens)
    with pytest.raises(ValueError, match=r"positions must be a \(first, last\) pair of positions within 0..5"):
        LogitLensGrid(lens_data(), positions=(3, 9))


# ----- AttentionView -----------------------------------------------------------------------------

def glm_mask(context: int, total: int) -> np.ndarray:
    """GLM's (s, s) mask for a sequence whose first `context` tokens are context, the rest causal from sop."""
    query, key = np.arange(total)[:, None], np.arange(total)[None, :]
    return (key < context) | (key <= query)


def attention_data(layers: int = 3, heads: int = 2, seed: int = 0):
    mask = glm_mask(4, len(TOKENS))
    rng = np.random.default_rng(seed)
    scores = rng.random((layers, heads, len(TOKENS), len(TOKENS))) * mask
    return scores / scores.sum(-1, keepdims=True), mask


def test_attention_view_shows_the_chosen_layer_and_head_with_masked_cells_hatched():
    probs, mask = attention_data()
    view = AttentionView({layer: probs[layer] for layer in range(3)}, TOKENS, mask)
    assert view.layer.value == 2 and view.head.value == "mean"
    np.testing.assert_allclose(view.matrix(), probs[2].mean(0), rtol=1e-6)
    view.layer.value, view.head.value = 0, 1
    np.testing.assert_allclose(view.matrix(), probs[0, 1], rtol=1e-6)
    assert bytes(view.image.value).startswith(b"\x89PNG") and view.title() == "layer 0, head 1"

    figure = view.figure()
    axes = figure.axes[0]
    shown = axes.images[0].get_array()
    assert np.array_equal(np.ma.getmaskarray(shown), ~mask)  # masked cells are not drawn as values
    hatched = np.zeros_like(mask)
    for patch in axes.patches:
        assert patch.get_gid() == "masked" and patch.get_hatch() == "///"
        x, y = patch.get_xy()
        hatched[int(y + 0.5), int(x + 0.5):int(x + 0.5 + patch.get_width())] = True
    assert np.array_equal(hatched, ~mask)  # ...but hatched, exactly where the mask forbids
    assert [t.get_text() for t in axes.get_xticklabels()] == ["def", "▁", "[MASK]", "(", "self", "<sop>"]

    keys = view.top_keys(query=4)  # 'self' (causal, from sop on) cannot see <sop> after it
    assert 5 not in [position for position, _, _ in keys] and len(keys) == 5
    assert keys == sorted(keys, key=lambda k: -k[2])
    assert "&lt;sop&gt;" in view.readout.value
    view.full_scale.value = True
    assert view.figure().axes[0].images[0].get_clim() == (0.0, 1.0)


def test_attention_view_takes_one_layer_a_4d_array_or_the_models_4d_mask():
    probs, mask = attention_data(layers=2)
    one = AttentionView(probs[1], TOKENS, mask[None, None])  # the model's (1, 1, s, t) mask
    assert list(one.layer.options) == [0] and one.layer.layout.display == "none"
    np.testing.assert_allclose(one.matrix(), probs[1].mean(0), rtol=1e-6)
    both = AttentionView(probs, TOKENS, mask, layer=0, head=1)
    np.testing.assert_allclose(both.matrix(), probs[0, 1], rtol=1e-6)
    assert masked_runs(np.array([[True, False, False, True, False]])) == [(0, 1, 2), (0, 4, 1)]
    tensors = AttentionView(torch.tensor(probs, dtype=torch.bfloat16), TOKENS, torch.tensor(mask))  # as probes give
    assert tensors.mask.dtype == bool and np.allclose(tensors.matrix(), probs[1].mean(0), atol=1e-2)
    rows = AttentionView(probs[:, :, [1, 5]], TOKENS, mask[[1, 5]], queries=[1, 5])  # two query rows
    assert rows.query_tokens == [" ", "<sop>"] and rows.top_keys(0)[0][0] in range(4)
    assert [t.get_text() for t in rows.figure().axes[0].get_yticklabels()] == ["▁", "<sop>"]
    with pytest.raises(ValueError, match=r"queries must give the position \(0..5\) of each of the 2 query rows"):
        AttentionView(probs[:, :, [1, 5]], TOKENS, mask[[1, 5]], queries=[1, 6])


@pytest.mark.parametrize("args, error, message", [
    (lambda p, m: (p[0, 0], TOKENS, m), ValueError, r"attention must be \(heads, s, t\)"),
    (lambda p, m: (p, TOKENS[:-1], m), ValueError, "tokens holds 5 labels but attention has 6 key positions"),
    (lambda p, m: (p, "def", m), TypeError, "tokens must be a list"),
    (lambda p, m: (p, TOKENS, m[:3]), ValueError, r"mask must be the \(s, t\) = \(6, 6\) bool mask"),
    (lambda p, m: (p, TOKENS, m.astype(int)), ValueError, "mask must be bool"),
    (lambda p, m: ({0: p[0], 1: p[1, :, :3]}, TOKENS, m), ValueError, r"attention\[1\] has shape"),
    (lambda p, m: ({}, TOKENS, m), ValueError, "attention is an empty mapping"),
    (lambda p, m: ({"a": p[0]}, TOKENS, m), ValueError, "attention's keys must be layer numbers"),
    (lambda p, m: (p[:, :, :, :4], TOKENS[:4], m[:, :4]), ValueError, "6 queries but 4 keys: pass queries="),
])
def test_attention_view_refuses_bad_input_naming_the_parameter(args, error, message):
    probs, mask = attention_data()
    with pytest.raises(error, match=message):
        AttentionView(*args(probs, mask))


def test_attention_view_refuses_a_layer_or_head_it_does_not_have():
    probs, mask = attention_data()
    with pytest.raises(ValueError, match=r"layer 5 is not among the attention's layers \[0, 1, 2\]"):
        AttentionView(probs, TOKENS, mask, layer=5)
    with pytest.raises(ValueError, match="head must be 'mean' or a head number 0..1"):
        AttentionView(probs, TOKENS, mask, head=2)
    with pytest.raises(ValueError, match="trace holds no attention probabilities"):
        AttentionView.from_trace(SimpleNamespace(values={"residual": probs}))
    for make in (AttentionView.from_backend, LogitLensGrid.from_backend):
        with pytest.raises(TypeError, match="backend must be a GLMPipeline or a GLMCluster"):
            make(object(), "x")


# ----- PatchingHeatmap ---------------------------------------------------------------------------

def patching_data():
    """Site 'block': change (layer - position) / 4, largest at layer 3, position 0; site 'mlp': only at (1, 5)."""
    rows = []
    for site in ("block", "mlp"):
        for layer in range(LAYERS):
            for position, token in enumerate(TOKENS):
                change = (layer - position) / 4 if site == "block" else (2.0 if (layer, position) == (1, 5) else 0.0)
                rows.append(dict(site=site, layer=layer, position=position, input_token=token,
                                 logprob_change=change, clean_logprob=-0.5, corrupted_logprob=-3.0,
                                 patched_logprob=-3.0 + change))
    return pd.DataFrame(rows)


def test_patching_heatmap_shows_each_sites_changes_coloured_by_sign():
    heat = PatchingHeatmap(patching_data())
    assert heat.site.value == "block" and list(heat.site.options) == ["block", "mlp"]
    matrix = heat.matrix()
    assert list(matrix.index) == [3, 2, 1, 0] and matrix.loc[2, 5] == pytest.approx(-0.75)
    cells = Cells(heat.grid.value)
    up, down, zero = cells.at(3, 0), cells.at(0, 5), cells.at(2, 2)
    assert up["text"] == "+0.75" and "hsl(6," in up["style"]  # red: the patch raised the answer's logprob
    assert down["text"] == "-1.25" and "hsl(218," in down["style"] and lightness(down["style"]) == 56
    assert lightness(zero["style"]) == 98
    assert "clean -0.500 · corrupted -3.000 · patched -2.250" in cells.at(3, 0)["title"]
    assert heat.strongest()["layer"] == 0 and heat.strongest()["position"] == 5  # |-1.25| beats +0.75
    heat.site.value = "mlp"
    assert heat.strongest() == {"layer": 1, "position": 5, "input_token": "<sop>", "logprob_change": 2.0,
                                "clean_logprob": -0.5, "corrupted_logprob": -3.0, "patched_logprob": -1.0}
    assert "largest change +2.000 at layer 1, position 5 (&lt;sop&gt;)" in heat.status.value
    fixed = PatchingHeatmap(patching_data(), site="mlp", scale=4.0)
    assert lightness(Cells(fixed.grid.value).at(1, 5)["style"]) == 77  # half of the fixed scale


def test_patching_heatmap_leaves_uncomputed_cells_empty_and_refuses_bad_frames():
    partial = patching_data().query("not (site == 'block' and layer == 1 and position == 2)")
    heat = PatchingHeatmap(partial)
    assert np.isnan(heat.matrix().loc[1, 2]) and 'title="not computed"' in heat.grid.value
    with pytest.raises(ValueError, match=r"results lacks the columns \['patched_logprob'\]"):
        PatchingHeatmap(patching_data().drop(columns="patched_logprob"))
    with pytest.raises(ValueError, match="more than one row for site 'block', layer 0, position 0"):
        PatchingHeatmap(pd.concat([patching_data(), patching_data().iloc[:1]]))
    with pytest.raises(ValueError, match=r"site must be one of \['block', 'mlp'\]"):
        PatchingHeatmap(patching_data(), site="attention")
    with pytest.raises(ValueError, match="scale must be a positive number"):
        PatchingHeatmap(patching_data(), scale=0)
    with pytest.raises(TypeError, match="results must be a pandas DataFrame"):
        PatchingHeatmap([{"site": "block"}])
    with pytest.raises(ValueError, match=r"results\['logprob_change'\] must hold numbers"):
        PatchingHeatmap(patching_data().assign(logprob_change="big"))


# ----- fuzz ----------------------------------------------------------------------------------------

SEED = 20261214
_PIECES = ["<script>alert(1)</script>", "&amp;", '"', "'", "\n", "\t", " ", "", "▁", "中文", "\U0001f600",
           "\u202e", "[MASK]", "<sop>", "a" * 40, "\x00", "x"]


def random_contract(rng: random.Random):
    layers, positions = rng.randint(1, 5), rng.randint(1, 9)
    tokens = [rng.choice(_PIECES) for _ in range(positions)]
    k = rng.randint(1, 4)
    top, target, patching = [], [], []
    for layer in range(layers):
        for position in range(positions):
            probs = sorted((rng.random() for _ in range(k)), reverse=True)
            for rank, prob in enumerate(probs, start=1):
                top.append(dict(layer=layer, position=position, input_token=tokens[position], rank=rank,
                                token_id=rng.randint(0, 99), token=rng.choice(_PIECES), prob=prob))
            target.append(dict(layer=layer, position=position, token_id=5, token=rng.choice(_PIECES),
                               prob=rng.random(), rank=rng.randint(1, 50)))
            patching.append(dict(site=rng.choice(["block", "attention"]) if layer else "block", layer=layer,
                                 position=position, input_token=tokens[position],
                                 logprob_change=rng.choice([rng.uniform(-9, 9), 0.0, float("nan")]),
                                 clean_logprob=-1.0, corrupted_logprob=-2.0, patched_logprob=-1.5))
    lens = SimpleNamespace(top=pd.DataFrame(top), target=pd.DataFrame(target) if rng.random() < 0.6 else None,
                           tokens=tokens if rng.random() < 0.5 else None)
    return lens, pd.DataFrame(patching).drop_duplicates(["site", "layer", "position"]), tokens, layers, positions


def test_fuzzed_contract_data_renders_every_cell_escaped():
    rng = random.Random(SEED)
    for _ in range(30):
        lens, patching, tokens, layers, positions = random_contract(rng)
        grid = LogitLensGrid(lens, positions=(0, positions - 1))
        cells = Cells(grid.grid.value)  # raises on a <script> element
        assert len(cells.cells) == layers * positions
        firsts = lens.top[lens.top["rank"] == 1].set_index(["layer", "position"])["token"]
        for cell in cells.cells:
            assert cell["text"] == token_text(firsts[int(cell["data-layer"]), int(cell["data-position"])])
        for view in grid.view.options:
            grid.view.value = view
        heat = PatchingHeatmap(patching)
        for site in heat.site.options:
            heat.site.value = site
            drawn = [c for c in Cells(heat.grid.value).cells if c.get("class") == "glmkit-patching-cell"]
            assert len(drawn) == len(heat.rows())


def test_fuzzed_broken_contract_data_is_refused_with_glmkits_errors():
    rng = random.Random(SEED + 1)
    for _ in range(40):
        lens, patching, *_ = random_contract(rng)
        breakage = rng.choice(["drop", "empty", "negative", "text", "not a frame"])
        frame = lens.top
        if breakage == "drop":
            frame = frame.drop(columns=rng.choice(list(frame.columns)))
        elif breakage == "empty":
            frame = frame.iloc[:0]
        elif breakage == "negative":
            frame = frame.assign(position=frame.position - 100)
        elif breakage == "text":
            frame = frame.assign(prob="p")
        else:
            frame = frame.to_dict("records")
        with pytest.raises((ValueError, TypeError), match="lens.top"):
            LogitLensGrid(SimpleNamespace(top=frame))


# ----- on the demo model's probes ---------------------------------------------------------------------

CODE = "def [MASK](self, other):\n    return self.value + other.value"


def test_the_widgets_show_the_demo_models_probes(pipeline, tokenizer):
    fill = pipeline.generate(CODE, max_new_tokens=5).blanks[0].tokens  # ' _value': ▁ _ value
    texts = [tokenizer.token_text(t) for t in fill]
    watch = len(fill) - 1  # the fill's last token ('value'), followed by its id: inside a word
    grid = LogitLensGrid.from_backend(pipeline, CODE, max_new_tokens=len(fill), top_k=3, target=fill[watch])
    top_layer, sop = max(grid.layers), grid.tokens.index("<sop>")
    assert grid.positions == list(range(len(grid.tokens))) and len(grid.tokens) == sop + 1 + len(fill)
    # The top layer of the lens is the model's own prediction: along the fill, the next token it generated.
    for step, token in enumerate(fill):
        shown = grid.cell(top_layer, sop + step)
        assert shown["text"] == token_text(tokenizer.token_text(token))
    at = sop + watch  # the position that predicts it
    first = grid.first_layer(at, token_id=fill[watch])
    word = texts[watch]
    assert first is not None and all(grid.cell(layer, at)["token"] == word for layer in grid.layers if layer >= first)
    assert first == min(grid.layers) or grid.cell(first - 1, at)["token"] != word
    grid.view.value = "target rank"
    assert grid.table().loc[top_layer, at] == "#1"

    view = AttentionView.from_backend(pipeline, CODE, layers=[0, 7])
    assert list(view.layer.options) == [0, 7] and view.tokens[-1] == "<sop>"
    np.testing.assert_allclose(view.matrix().sum(-1), 1.0, rtol=1e-5)
    context = len(view.tokens) - 1  # GLM: everything before sop is context, seen both ways; sop sees all
    assert view.mask[:, :context].all() and view.mask[-1].all() and np.array_equal(view.mask, glm_mask(
        context, len(view.tokens)))

    heat = PatchingHeatmap.from_backend(pipeline, "English: house\nGerman:", "English: water\nGerman:",
                                        target=tokenizer.encode("Haus")[0], layers=[0, 7])
    self_patch = heat.results.query("layer == 7 and position == @heat.results.position.max()")
    assert len(self_patch) == 1
    # At the last block, copying sop's residual copies the clean prediction whole: the clean log p comes back.
    row = self_patch.iloc[0]
    assert row["patched_logprob"] == pytest.approx(row["clean_logprob"], abs=1e-4)
    assert heat.strongest()["logprob_change"] == pytest.approx(row["logprob_change"], abs=1e-4)


def test_fuzzed_attention_input_is_drawn_or_refused_naming_the_parameter():
    rng = np.random.default_rng(SEED + 2)
    for case in range(30):
        layers, heads, t = int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(1, 12))
        s = int(rng.integers(1, t + 1))  # the last s positions are the queries
        mask = glm_mask(int(rng.integers(0, t + 1)), t)[t - s:]
        probs = rng.random((layers, heads, s, t)).astype(np.float32) * mask
        tokens = [str(rng.choice(_PIECES)) for _ in range(t)]
        breakage = case % 5
        if breakage == 0:  # valid: drawn, and the masked cells are exactly the hatched ones
            view = AttentionView(probs, tokens, mask, head=int(rng.integers(0, heads)))
            assert bytes(view.image.value).startswith(b"\x89PNG")
            hatched = sum(p.get_width() for p in view.figure().axes[0].patches)
            assert hatched == (~mask).sum() and all(mask[-1][k] for k, _, _ in view.top_keys())
            continue
        args, name = {1: ((probs[0, 0], tokens, mask), "attention"),
                      2: ((probs, tokens + ["x"], mask), "tokens"),
                      3: ((probs, tokens, mask.T if s != t else mask[:, :-1]), "mask"),
                      4: ((probs, tokens, mask.astype(np.float32)), "mask")}[breakage]
        with pytest.raises((ValueError, TypeError), match=name):
            AttentionView(*args)
