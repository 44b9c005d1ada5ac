"""Pure HTML rendering for the widget tools: tokens, visible whitespace, generations with probabilities.

Everything here is a plain function of its inputs (no widgets), and every piece of user or model text
goes through `html.escape`, so a prompt holding `<script>` renders as text.
"""
from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass

import pandas as pd

from ..escapes import escape_text, unescape  # noqa: F401 - the widgets' escapes, shared with the CLI
from ..tokenizer import Token

# Light, distinguishable backgrounds; neighbouring tokens alternate so every boundary shows.
TOKEN_COLOURS = ("#dbeafe", "#fde68a", "#bbf7d0", "#fbcfe8", "#ddd6fe", "#fed7aa")
SPECIAL_COLOUR = "#fca5a5"
BLANK_COLOUR = "#fff3b0"
MONO = "font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace"
BOX = f"{MONO}; white-space: pre-wrap; word-break: break-word; line-height: 1.7"
_DIM = "color:#888"


def esc(text: str) -> str:
    """HTML-escape text, quotes included (safe inside attributes too)."""
    return html.escape(text, quote=True)


def visible_whitespace_html(text: str) -> str:
    """Text as HTML with newlines (↵), tabs (→) and spaces at line ends or in runs (·) made visible."""
    out = []
    for number, line in enumerate(text.split("\n")):
        if number:
            out.append(f'<span style="{_DIM}">↵</span>\n')
        body = line.rstrip(" ")
        trailing = len(line) - len(body)
        for chunk in _split_runs(body):
            if chunk == "\t":
                out.append(f'<span style="{_DIM}">→</span>\t')
            elif chunk.startswith("  "):
                out.append(f'<span style="{_DIM}">{"·" * len(chunk)}</span>')
            else:
                out.append(esc(chunk))
        if trailing:
            out.append(f'<span style="color:#b45309;background:#fde68a" title="trailing spaces">'
                       f'{"·" * trailing}</span>')
    return "".join(out)


def _split_runs(text: str) -> list[str]:
    """Split into tabs, runs of 2+ spaces, and everything else."""
    parts: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\t":
            parts.append("\t")
            i += 1
        elif text.startswith("  ", i):
            j = i
            while j < len(text) and text[j] == " ":
                j += 1
            parts.append(text[i:j])
            i = j
        else:
            j = i + 1
            while j < len(text) and text[j] != "\t" and not text.startswith("  ", j):
                j += 1
            parts.append(text[i:j])
            i = j
    return parts


# ----- tokens ---------------------------------------------------------------------------------------

def token_label(token: Token) -> str:
    """What a token looks like with the invisible made visible (plain text, not escaped)."""
    if token.kind == "dummy_prefix":
        return "▁"
    if token.kind == "newline":
        return "↵"
    if token.kind == "tab":
        return "→"
    if token.kind == "blank":
        return "▁" * len(token.text) if token.text else token.piece
    if token.kind == "byte":
        return token.text if token.text else token.piece[1:-1]  # "<0xE4>" -> "0xE4"
    if token.kind == "special":
        return token.piece
    if token.kind == "unknown":
        return "⁇" + token.text
    label = token.text.replace(" ", "▁") if token.text else token.piece
    return "▁" + label if merged_dummy_prefix(token) else label


def merged_dummy_prefix(token: Token) -> bool:
    """True when SentencePiece's dummy-prefix space is glued to this piece ('▁a' covering just 'a')."""
    return token.kind == "text" and token.piece.startswith("▁") and not token.text.startswith(" ")


@dataclass(frozen=True)
class RoundTripWarning:
    """Typed text the tokenizer reads as something else: `literal` at start..end, read as `reads_as`."""

    start: int
    end: int
    literal: str
    reads_as: str
    decodes_to: str

    def message(self) -> str:
        """One sentence: what was typed, what the tokenizer reads, and what decoding gives back."""
        return (f"{self.literal!r} (characters {self.start}–{self.end}) is read as {self.reads_as}, "
                f"not as the characters you typed: the model sees that, and decoding gives "
                f"{self.decodes_to!r}")


_WHITESPACE_KINDS = {"newline": ("\n", "a newline (the <n> token)"), "tab": ("\t", "a tab (the <|tab|> token)")}


def round_trip_warnings(tokens: list[Token]) -> list[RoundTripWarning]:
    """Where typed text does not survive tokenizing: a literal `<n>`, `<|tab|>`, `<|blank_N|>` or `▁`.

    GLM's tokenizer writes a newline as the piece `<n>`, a tab as `<|tab|>`, a run of N spaces as
    `<|blank_N|>`, and SentencePiece writes a space as `▁`; so the same characters typed by a user are
    read as that whitespace. A token covering such characters is one whose text is not what it stands for.
    """
    warnings = []
    for token in tokens:
        if token.kind in _WHITESPACE_KINDS and token.text != _WHITESPACE_KINDS[token.kind][0]:
            surface, reads_as = _WHITESPACE_KINDS[token.kind]
            warnings.append(RoundTripWarning(token.start, token.end, token.text, reads_as, surface))
        elif token.kind == "blank" and token.text.strip(" "):
            n = int(re.fullmatch(r"<\|blank_(\d+)\|>", token.piece).group(1))
            warnings.append(RoundTripWarning(token.start, token.end, token.text,
                                             f"{n} spaces (the {token.piece} token)", " " * n))
        elif token.kind == "text" and "▁" in token.text:
            for match in re.finditer("▁+", token.text):
                start = token.start + match.start()
                n = len(match.group())
                warnings.append(RoundTripWarning(
                    start, start + n, match.group(),
                    f"{'a space' if n == 1 else f'{n} spaces'} (▁ is SentencePiece's own mark for a space)",
                    " " * n))
    return warnings


def token_tooltip(token: Token, index: int) -> str:
    """Hover text of a token: position, id, piece, kind and the characters it covers."""
    return (f"#{index}  id {token.id}  piece {token.piece!r}\n"
            f"kind {token.kind}  chars {token.start}–{token.end} {token.text!r}")


def tokens_html(tokens: list[Token], diverge_at: int | None = None) -> str:
    """Tokens as coloured spans (id, piece and kind on hover); tokens from `diverge_at` on are outlined.

    Tokens holding typed text that does not round-trip (see `round_trip_warnings`) get a wavy red
    underline and the reason in their tooltip.
    """
    spans = []
    warnings = round_trip_warnings(tokens)
    for i, token in enumerate(tokens):
        warned = [x for x in warnings if token.start <= x.start and x.end <= token.end and x.end > x.start]
        colour = SPECIAL_COLOUR if token.kind == "special" else TOKEN_COLOURS[i % len(TOKEN_COLOURS)]
        style = f"background:{colour};border-radius:3px;padding:0 1px;margin:0 1px"
        if token.kind in ("dummy_prefix", "newline", "tab", "blank", "byte", "unknown", "user_defined"):
            style += ";color:#1e3a8a;font-style:italic"
        if token.kind == "dummy_prefix":
            style += ";opacity:0.6"
        if token.kind == "byte":
            style += ";border:1px dashed #6b7280;font-size:85%"
        if diverge_at is not None and i >= diverge_at:
            style += (";outline:2px solid #dc2626" if i == diverge_at else ";outline:1px dotted #dc2626")
        title = token_tooltip(token, i)
        if warned:
            style += ";text-decoration:underline wavy #dc2626"
            title += "\n" + "\n".join(x.message() for x in warned)
        label = esc(token_label(token))
        if warned and token.kind in ("newline", "tab", "blank"):
            label = esc(token.text)  # show what was typed, underlined, not the whitespace it became
        if merged_dummy_prefix(token):  # the ▁ stands for no character of the text: dim it
            label = f'<span style="opacity:0.45" title="dummy prefix">▁</span>{label[1:]}'
        # A newline token also breaks the line, so the layout follows the text.
        tail = "\n" if token.kind == "newline" else ""
        mark = ' data-round-trip="no"' if warned else ""
        spans.append(f'<span class="glmkit-token" data-id="{token.id}"{mark} style="{style}" '
                     f'title="{esc(title)}">{label}</span>{tail}')
    return f'<div style="{BOX}">{"".join(spans)}</div>'


def token_counts(tokens: list[Token], text: str) -> dict[str, float]:
    """Number of tokens, characters, and characters per token of a text."""
    count = len(tokens)
    return {"tokens": count, "characters": len(text),
            "chars_per_token": round(len(text) / count, 2) if count else 0.0}


def selection_counts(tokens: list[Token], text: str, start: int, end: int) -> dict[str, int]:
    """Characters of text[start:end] and the tokens touching it (a token partly inside counts, as does
    one covering no character, such as the dummy prefix, placed inside)."""
    start, end = max(0, min(start, len(text))), max(0, min(end, len(text)))
    start, end = min(start, end), max(start, end)
    touching = [t for t in tokens if (t.start < end and t.end > start)
                or (t.start == t.end and start <= t.start < end)]
    whole = [t for t in touching if start <= t.start and t.end <= end]
    return {"start": start, "end": end, "characters": end - start, "tokens": len(touching),
            "whole_tokens": len(whole)}


def first_span_divergence(a: list[Token], b: list[Token]) -> int | None:
    """Index of the first token whose character span differs (for two tokenizers, whose ids differ)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if (x.start, x.end) != (y.start, y.end):
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def tokens_frame(tokens: list[Token]) -> pd.DataFrame:
    """One row per token: position, id, piece, covered text, character span and kind."""
    columns = ["id", "piece", "text", "start", "end", "kind"]
    frame = pd.DataFrame([[getattr(t, c) for c in columns] for t in tokens], columns=columns)
    frame.index.name = "position"
    return frame


def first_divergence(a: list[Token], b: list[Token]) -> int | None:
    """Index of the first token whose id differs (or where one list ends early); None if identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x.id != y.id:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def describe_divergence(a: list[Token], b: list[Token], index: int | None) -> str:
    """A sentence saying where two token lists part (plain text)."""
    if index is None:
        return f"identical: the same {len(a)} tokens"

    def show(tokens):
        if index >= len(tokens):
            return "(end)"
        t = tokens[index]
        return f"{t.piece!r} (id {t.id}, {t.kind})"
    return f"first divergence at token #{index}: {show(a)} vs {show(b)}"


# ----- generations ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Segment:
    """A run of generated text; `logprob` and `top` describe the token it ends with (None if unknown)."""

    text: str
    logprob: float | None = None
    top: tuple[tuple[str, float], ...] = ()


def probability_colour(logprob: float) -> str:
    """Background colour for a token probability: red (unlikely) through yellow to green (likely)."""
    p = min(1.0, max(0.0, math.exp(logprob)))
    return f"hsl({round(120 * p)}, 85%, 80%)"


def segment_title(segment: Segment) -> str:
    """Hover text of a generated token: its probability and the likeliest alternatives."""
    lines = [f"p = {math.exp(segment.logprob):.3f} (logprob {segment.logprob:.3f})"]
    if segment.top:
        lines.append("top alternatives:")
        lines += [f"  {piece!r}  p = {math.exp(lp):.3f}" for piece, lp in segment.top]
    return "\n".join(lines)


def segments_html(segments: list[Segment], probabilities: bool) -> str:
    """Generated text of one blank; with `probabilities` each token is coloured and has a tooltip."""
    parts = []
    for segment in segments:
        if probabilities and segment.logprob is not None:
            parts.append(f'<span style="background:{probability_colour(segment.logprob)}" '
                         f'title="{esc(segment_title(segment))}">{esc(segment.text)}</span>')
        else:
            parts.append(esc(segment.text))
    return "".join(parts)


def generation_html(pieces: list[str], blanks: list[list[Segment]], mask_name: str, *,
                    probabilities: bool = False, streaming: bool = False) -> str:
    """A prompt's text pieces around its masks, with each filled blank highlighted.

    `pieces` are the prompt split at its masks (no mask: the prompt and an empty tail, the [gMASK]
    that GLM appends). `blanks[k]` fills the mask after `pieces[k]`; masks not yet filled show their
    name, dimmed. While `streaming`, the last blank shows a cursor.
    """
    out = []
    for k, piece in enumerate(pieces):
        out.append(f'<span style="color:#374151">{esc(piece)}</span>')
        if k == len(pieces) - 1:
            break
        if k < len(blanks):
            live = streaming and k == len(blanks) - 1
            border = "1px dashed #d97706" if live else "1px solid #d97706"
            cursor = '<span style="color:#d97706">▌</span>' if live else ""
            out.append(f'<span class="glmkit-blank" style="background:{BLANK_COLOUR};border:{border};'
                       f'border-radius:3px" title="blank {k + 1}">'
                       f'{segments_html(blanks[k], probabilities)}{cursor}</span>')
        else:
            out.append(f'<span style="{_DIM}">{esc(mask_name)}</span>')
    return f'<div style="{BOX}">{"".join(out)}</div>'


def logprob_table_html(rows: list[dict]) -> str:
    """Per-token table of a generation: position, blank, id, piece, p, logprob and the top alternatives.

    Each row has `position`, `blank`, `id`, `piece`, `logprob` and `top` (a list of (piece, logprob)).
    """
    if not rows:
        return ""
    head = "".join(f"<th style='text-align:left;padding:0 6px'>{name}</th>"
                   for name in ("#", "blank", "id", "token", "p", "logprob", "top alternatives"))
    body = []
    for row in rows:
        top = " · ".join(f"{esc(repr(piece))} {math.exp(lp):.3f}" for piece, lp in row["top"])
        cells = [row["position"], row["blank"] + 1, row["id"], esc(repr(row["piece"])),
                 f"{math.exp(row['logprob']):.3f}", f"{row['logprob']:.3f}", top]
        colour = probability_colour(row["logprob"])
        body.append("<tr>" + "".join(
            f"<td style='padding:0 6px{';background:' + colour if i == 3 else ''}'>{cell}</td>"
            for i, cell in enumerate(cells)) + "</tr>")
    return (f'<table class="glmkit-logprobs" style="{MONO};font-size:85%;border-collapse:collapse">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
