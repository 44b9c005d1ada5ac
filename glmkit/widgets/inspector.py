"""The tokenizer inspector: see how GLM tokenizes a text, and where two texts' (or tokenizers') tokens part."""
from __future__ import annotations

import json

import ipywidgets as w
import pandas as pd

from ..tokenizer import Token
from ._base import Tool, info_html
from .render import (describe_divergence, esc, first_divergence, first_span_divergence, round_trip_warnings,
                     selection_counts, token_counts, tokens_frame, tokens_html)

LEGEND = ("<b>▁</b> a space (dimmed: SentencePiece's dummy prefix, no character of the text) · "
          "<b>↵</b> newline (<code>&lt;n&gt;</code>) · <b>→</b> tab (<code>&lt;|tab|&gt;</code>) · "
          "<b>▁▁▁</b> a run of spaces (<code>&lt;|blank_N|&gt;</code>) · dashed box: byte fallback "
          "(the last byte shows the character) · red: special tokens such as <code>[MASK]</code> · "
          "wavy underline: typed text the tokenizer reads as something else. "
          "Hover a token for its id and piece.")


def counts_html(counts: dict) -> str:
    """One line with a text's token and character counts."""
    return info_html(f"{counts['tokens']} tokens · {counts['characters']} characters · "
                     f"{counts['chars_per_token']} characters per token")


def warnings_html(tokens: list[Token]) -> str:
    """A warning line per piece of typed text that does not survive tokenizing ("" when all does)."""
    lines = [f"⚠ {esc(x.message())}" for x in round_trip_warnings(tokens)]
    if not lines:
        return ""
    return ('<div style="color:#b45309;font-size:90%">' + "<br>".join(lines) + "</div>")


class TokenInspector(Tool):
    """Tokens of a text as coloured spans, with counts and copyable ids; optionally a second text (or the
    same text under `second_tokenizer`) and where the two tokenizations part.

    `tokenizer` is a GLMTokenizer or anything with a `.tokenizer` (a pipeline or a cluster). `selection`
    is a character range of the first text; its character and token counts are shown under it (a
    Textarea tells the kernel nothing about the mouse selection, so the range is set here).
    """

    def __init__(self, tokenizer, text: str = "", compare: str | None = None, add_dummy_prefix: bool = True,
                 second_tokenizer=None):
        super().__init__()
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        self.second_tokenizer = getattr(second_tokenizer, "tokenizer", second_tokenizer)
        area = dict(continuous_update=True, layout=w.Layout(width="100%", height="6em"))
        self.text_a = w.Textarea(value=text, placeholder="text to tokenize", **area)
        self.text_b = w.Textarea(value=compare or "", placeholder="a second text to compare", **area)
        self.compare = w.Checkbox(compare is not None, description="compare with a second text", indent=False)
        self.compare_tokenizers = w.Checkbox(False, indent=False, description="compare with the second tokenizer",
                                             layout=w.Layout(display=None if self.second_tokenizer else "none"))
        self.dummy_prefix = w.Checkbox(add_dummy_prefix, indent=False,
                                       description="add the dummy prefix (as GLM prompts do)")
        self.view_a, self.view_b = w.HTML(), w.HTML()
        self.counts_a, self.counts_b = w.HTML(), w.HTML()
        self.warnings_a, self.warnings_b = w.HTML(), w.HTML()
        ids = dict(layout=w.Layout(width="100%", height="3.5em"))
        self.ids_a, self.ids_b = w.Textarea(**ids), w.Textarea(**ids)
        self.selection = w.IntRangeSlider(value=(0, len(text)), min=0, max=max(len(text), 1),
                                          description="selection", continuous_update=True,
                                          style={"description_width": "5.5em"}, layout=w.Layout(width="100%"))
        self.selection_counts = w.HTML()
        self.divergence_line = w.HTML()
        self._tokens: tuple[list[Token], list[Token]] = ([], [])

        update = self._guarded(lambda _: self.refresh())
        for widget in (self.text_a, self.text_b, self.compare, self.compare_tokenizers, self.dummy_prefix):
            widget.observe(update, "value")
        self.selection.observe(self._guarded(lambda _: self._count_selection()), "value")
        # One Layout each: a shared one hid the first column too when the second was hidden.
        half = dict(width="50%", padding="0 4px")
        ids_label = '<span style="font-size:90%;color:#555">token ids (select and copy)</span>'
        self.column_b = w.VBox([self.text_b, self.counts_b, self.warnings_b, self.view_b, w.HTML(ids_label),
                                self.ids_b], layout=w.Layout(**half))
        self.column_a = w.VBox([self.text_a, self.counts_a, self.selection, self.selection_counts, self.warnings_a,
                           self.view_a, w.HTML(ids_label), self.ids_a], layout=w.Layout(**half))
        columns = w.HBox([self.column_a, self.column_b], layout=w.Layout(width="100%"))
        legend = w.HTML(f'<div style="font-size:90%;color:#555">{LEGEND}</div>')
        for box in (self.compare, self.compare_tokenizers, self.dummy_prefix):
            box.layout.width = "auto"  # the stock 300px cut "add the dummy prefix (as GLM prompts do)"
        self._finish([w.HBox([self.compare, self.compare_tokenizers, self.dummy_prefix],
                             layout=w.Layout(grid_gap="12px")), columns, self.divergence_line, legend])
        self.refresh()

    def tokens(self, side: int = 0) -> list[Token]:
        """The tokens of the first (0) or second (1) text, as last rendered."""
        return self._tokens[side]

    def ids(self, side: int = 0) -> list[int]:
        """The token ids of the first (0) or second (1) text, as shown in its ids box."""
        return [t.id for t in self._tokens[side]]

    @property
    def comparing(self) -> bool:
        """True when the second column is shown (a second text, or the second tokenizer)."""
        return self.compare.value or self._two_tokenizers

    @property
    def _two_tokenizers(self) -> bool:
        return self.second_tokenizer is not None and self.compare_tokenizers.value

    @property
    def divergence(self) -> int | None:
        """Index of the first token where the two sides differ (None when identical or not comparing):
        by id for one tokenizer, by character span for two (their ids mean different pieces)."""
        if not self.comparing:
            return None
        diverge = first_span_divergence if self._two_tokenizers else first_divergence
        return diverge(*self._tokens)

    def refresh(self) -> None:
        """Re-tokenize and re-render both sides."""
        comparing = self.comparing
        self.column_b.layout.display = None if comparing else "none"
        self.column_b.layout.width = "50%" if comparing else "0"
        self.column_a.layout.width = "50%" if comparing else "100%"
        # The second tokenizer reads the second text when one is compared, else the first text.
        self.text_b.layout.display = None if self.compare.value else "none"
        text_b = self.text_b.value if self.compare.value else self.text_a.value
        a = self._tokenize(self.tokenizer, self.text_a.value)
        b = self._tokenize(self.second_tokenizer if self._two_tokenizers else self.tokenizer, text_b) \
            if comparing else []
        self._tokens = (a, b)
        at = self.divergence
        self.view_a.value = tokens_html(a, at)
        self.counts_a.value = counts_html(token_counts(a, self.text_a.value))
        self.warnings_a.value = warnings_html(a)
        self.ids_a.value = json.dumps([t.id for t in a])
        self._fit_selection(len(self.text_a.value))
        if comparing:
            self.view_b.value = tokens_html(b, at)
            self.counts_b.value = counts_html(token_counts(b, text_b))
            self.warnings_b.value = warnings_html(b)
            self.ids_b.value = json.dumps([t.id for t in b])
            self.divergence_line.value = f"<b>{esc(describe_divergence(a, b, at))}</b>"
        else:
            for view in (self.view_b, self.counts_b, self.warnings_b, self.ids_b, self.divergence_line):
                view.value = ""

    def _fit_selection(self, length: int) -> None:
        """Keep the selection inside the text; one that reached the end keeps reaching it as text is typed."""
        low, high = self.selection.value
        high = length if high >= self.selection.max else min(high, length)
        with self.selection.hold_trait_notifications():
            self.selection.max = max(length, 1)
            self.selection.value = (min(low, length), high)
        self._count_selection()

    def select(self, start: int, end: int) -> dict:
        """Set the selection to characters start..end of the first text; returns its counts."""
        self.selection.value = (start, end)
        return self.selection_info()

    def selection_info(self) -> dict:
        """Characters and tokens of the selection: start, end, characters, tokens (touching), whole_tokens."""
        low, high = self.selection.value
        return selection_counts(self._tokens[0], self.text_a.value, low, high)

    def _count_selection(self) -> None:
        info = self.selection_info()
        self.selection_counts.value = info_html(
            f"selection {info['start']}–{info['end']}: {info['characters']} characters · {info['tokens']} "
            f"tokens touch it ({info['whole_tokens']} wholly inside)")

    def _tokenize(self, tokenizer, text: str) -> list[Token]:
        return tokenizer.tokens(text, add_dummy_prefix=self.dummy_prefix.value)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per token (id, piece, text, start, end, kind); indexed by (text, position) when comparing."""
        if not self.comparing:
            return tokens_frame(self._tokens[0])
        return pd.concat({"a": tokens_frame(self._tokens[0]), "b": tokens_frame(self._tokens[1])},
                         names=["text", "position"])
