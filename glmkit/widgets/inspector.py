"""The tokenizer inspector: see how GLM tokenizes a text, and where two texts' tokens part."""
from __future__ import annotations

import ipywidgets as w
import pandas as pd

from ..tokenizer import Token
from ._base import Tool, info_html
from .render import (describe_divergence, esc, first_divergence, token_counts, tokens_frame,
                     tokens_html)

LEGEND = ("<b>▁</b> a space (dimmed: SentencePiece's dummy prefix, no character of the text) · "
          "<b>↵</b> newline (<code>&lt;n&gt;</code>) · <b>→</b> tab (<code>&lt;|tab|&gt;</code>) · "
          "<b>▁▁▁</b> a run of spaces (<code>&lt;|blank_N|&gt;</code>) · dashed box: byte fallback "
          "(the last byte shows the character) · red: special tokens such as <code>[MASK]</code>. "
          "Hover a token for its id and piece.")


def counts_html(counts: dict) -> str:
    """One line with a text's token and character counts."""
    return info_html(f"{counts['tokens']} tokens · {counts['characters']} characters · "
                     f"{counts['chars_per_token']} characters per token")


class TokenInspector(Tool):
    """Tokens of a text as coloured spans, with counts; optionally a second text and their first divergence.

    `tokenizer` is a GLMTokenizer or anything with a `.tokenizer` (a pipeline or a cluster).
    """

    def __init__(self, tokenizer, text: str = "", compare: str | None = None, add_dummy_prefix: bool = True):
        super().__init__()
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        area = dict(continuous_update=True, layout=w.Layout(width="100%", height="6em"))
        self.text_a = w.Textarea(value=text, placeholder="text to tokenize", **area)
        self.text_b = w.Textarea(value=compare or "", placeholder="a second text to compare", **area)
        self.compare = w.Checkbox(compare is not None, description="compare with a second text", indent=False)
        self.dummy_prefix = w.Checkbox(add_dummy_prefix, indent=False,
                                       description="add the dummy prefix (as GLM prompts do)")
        self.view_a, self.view_b = w.HTML(), w.HTML()
        self.counts_a, self.counts_b = w.HTML(), w.HTML()
        self.divergence_line = w.HTML()
        self._tokens: tuple[list[Token], list[Token]] = ([], [])

        update = self._guarded(lambda _: self.refresh())
        for widget in (self.text_a, self.text_b, self.compare, self.dummy_prefix):
            widget.observe(update, "value")
        half = w.Layout(width="50%", padding="0 4px")
        self.column_b = w.VBox([self.text_b, self.counts_b, self.view_b], layout=half)
        columns = w.HBox([w.VBox([self.text_a, self.counts_a, self.view_a], layout=half), self.column_b],
                         layout=w.Layout(width="100%"))
        legend = w.HTML(f'<div style="font-size:90%;color:#555">{LEGEND}</div>')
        self._finish([w.HBox([self.compare, self.dummy_prefix]), columns, self.divergence_line, legend])
        self.refresh()

    def tokens(self, side: int = 0) -> list[Token]:
        """The tokens of the first (0) or second (1) text, as last rendered."""
        return self._tokens[side]

    @property
    def divergence(self) -> int | None:
        """Index of the first token where the two texts differ (None when identical or not comparing)."""
        if not self.compare.value:
            return None
        return first_divergence(*self._tokens)

    def refresh(self) -> None:
        """Re-tokenize and re-render both texts."""
        comparing = self.compare.value
        self.column_b.layout.display = None if comparing else "none"
        self.column_b.layout.width = "50%" if comparing else "0"
        a = self._tokenize(self.text_a.value)
        b = self._tokenize(self.text_b.value) if comparing else []
        self._tokens = (a, b)
        at = first_divergence(a, b) if comparing else None
        self.view_a.value = tokens_html(a, at)
        self.counts_a.value = counts_html(token_counts(a, self.text_a.value))
        if comparing:
            self.view_b.value = tokens_html(b, at)
            self.counts_b.value = counts_html(token_counts(b, self.text_b.value))
            self.divergence_line.value = f"<b>{esc(describe_divergence(a, b, at))}</b>"
        else:
            self.view_b.value = self.counts_b.value = self.divergence_line.value = ""

    def _tokenize(self, text: str) -> list[Token]:
        return self.tokenizer.tokens(text, add_dummy_prefix=self.dummy_prefix.value)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per token (id, piece, text, start, end, kind); indexed by (text, position) when comparing."""
        if not self.compare.value:
            return tokens_frame(self._tokens[0])
        return pd.concat({"a": tokens_frame(self._tokens[0]), "b": tokens_frame(self._tokens[1])},
                         names=["text", "position"])
