"""TokenInspector: text the tokenizer cannot round-trip, copyable ids, selection counts, two tokenizers."""
from __future__ import annotations

import html as html_lib
import json

from glmkit.tokenizer import GLMTokenizer
from glmkit.widgets import Playground, TokenInspector
from glmkit.widgets.render import round_trip_warnings


def test_typed_whitespace_pieces_are_flagged_with_what_the_tokenizer_reads(tokenizer):
    text = "a<n>b<|tab|>c<|blank_3|>d▁e"
    inspector = TokenInspector(tokenizer, text)
    view = inspector.view_a.value
    assert view.count('data-round-trip="no"') == 4 and "underline wavy" in view
    assert "&lt;n&gt;" in view  # the typed characters are shown, underlined, not a bare newline mark
    shown = html_lib.unescape(inspector.warnings_a.value)
    assert "'<n>' (characters 1–4) is read as a newline" in shown and "decoding gives '\\n'" in shown
    assert "'<|tab|>' (characters 5–12) is read as a tab" in shown
    assert "'<|blank_3|>' (characters 13–24) is read as 3 spaces" in shown
    assert "'▁' (characters 25–26) is read as a space" in shown
    # ...and it is true: the tokenizer gives these back as whitespace.
    assert tokenizer.decode(inspector.ids()) == "a\nb\tc   d e"
    assert "is read as a newline" in html_lib.unescape(view)  # the reason is in the token's tooltip too

    inspector.text_a.value = "a\nb\tc   d e <|blank_99|> <0xE4>"  # real whitespace, and no such pieces
    assert inspector.warnings_a.value == "" and 'data-round-trip' not in inspector.view_a.value
    assert round_trip_warnings(tokenizer.tokens("x [MASK] y")) == []


def test_the_playground_prompt_line_warns_about_a_typed_newline_piece(tokenizer):
    class Backend:
        pass
    backend = Backend()
    backend.tokenizer = tokenizer
    pg = Playground(backend, prompt="English: cheese<n>German:")
    assert "is read as a newline" in html_lib.unescape(pg.token_count.value)
    pg.prompt.value = "English: cheese\nGerman:"
    assert "is read as" not in pg.token_count.value


def test_token_ids_are_shown_and_selection_counts_follow_the_range(tokenizer):
    text = "def area(r):\n    return r"
    inspector = TokenInspector(tokenizer, text)
    ids = tokenizer.encode_with_masks(text)
    assert json.loads(inspector.ids_a.value) == ids == inspector.ids()
    assert inspector.selection.value == (0, len(text)) and f"{len(ids)} tokens touch it" in \
        inspector.selection_counts.value
    info = inspector.select(13, 17)  # the four spaces of indentation: one <|blank_4|> token
    assert info == {"start": 13, "end": 17, "characters": 4, "tokens": 1, "whole_tokens": 1}
    assert "selection 13–17: 4 characters · 1 tokens touch it" in inspector.selection_counts.value
    info = inspector.select(14, 20)  # inside the blank, then 'ret': both touched, neither wholly inside
    pieces = [t.piece for t in inspector.tokens() if t.start < 20 and t.end > 14]
    assert info["tokens"] == len(pieces) and info["whole_tokens"] < info["tokens"]
    inspector.text_a.value = text + " * r"  # a selection that reached the end keeps following the text
    inspector.select(0, len(inspector.text_a.value))
    inspector.text_a.value += " * r"
    assert inspector.selection.value == (0, len(inspector.text_a.value))
    inspector.text_a.value = "ab"
    assert inspector.selection.value == (0, 2)


def test_two_tokenizers_tokenize_the_same_text_side_by_side(tokenizer, tmp_path):
    other = GLMTokenizer(tokenizer.model_file)  # offline, the demo tokenizer is the only one: load it twice
    inspector = TokenInspector(tokenizer, "German: Haus", second_tokenizer=other)
    assert inspector.compare_tokenizers.layout.display is None and not inspector.comparing
    inspector.compare_tokenizers.value = True
    assert inspector.comparing and inspector.text_b.layout.display == "none"
    assert inspector.ids(1) == inspector.ids(0) and inspector.divergence is None
    assert "identical" in inspector.divergence_line.value
    inspector.compare.value = True  # the second tokenizer on a second text
    inspector.text_b.value = "German:  Haus"
    at = inspector.divergence
    a, b = inspector.tokens(0), inspector.tokens(1)
    assert at is not None and (a[at].start, a[at].end) != (b[at].start, b[at].end)
    assert all((x.start, x.end) == (y.start, y.end) for x, y in zip(a[:at], b[:at]))
    assert json.loads(inspector.ids_b.value) == [t.id for t in b]
    assert list(inspector.to_dataframe().loc["b"]["id"]) == [t.id for t in b]
    alone = TokenInspector(tokenizer, "x")
    assert alone.compare_tokenizers.layout.display == "none"


def test_one_text_alone_is_shown(tokenizer):
    inspector = TokenInspector(tokenizer, "x = 1")
    columns = inspector.root.children[1]  # the text columns, under the checkboxes
    first, second = columns.children
    assert second.layout.display == "none" and first.layout.display != "none"
    inspector.compare.value = True
    assert first.layout.display != "none" and second.layout.display != "none"
