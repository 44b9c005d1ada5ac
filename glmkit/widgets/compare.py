"""Compare mode's pure parts: two generations of one prompt, token by token, and where they part."""
from __future__ import annotations

from ..generate.blanks import GenerationResult
from .render import BLANK_COLOUR, BOX, esc


def generated_ids(result: GenerationResult) -> list[int]:
    """Every generated token id of a result, blank after blank."""
    return [token for blank in result.blanks for token in blank.tokens]


def first_id_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing id (or where the shorter list ends); None when identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def token_texts(tokenizer, blank) -> list[str]:
    """Each generated token's share of `blank.text`, in order; they join to exactly `blank.text`.

    A character spelled by several byte tokens belongs to the last of them; tokens past a stop string's
    cut get "" (they were generated, then cut away).
    """
    text = blank.text
    full = tokenizer.decode(blank.tokens)
    # The blank may start with a space the decoder restores (a new word after the prompt's last character).
    lead = 1 if text.startswith(" ") and not full.startswith(" ") else 0
    ends, previous = [], lead
    for i in range(1, len(blank.tokens) + 1):
        shown = tokenizer.decode(blank.tokens[:i]).rstrip("\ufffd")  # an unfinished multi-byte character
        end = min(len(text), max(previous, lead + len(shown)))
        ends.append(end)
        previous = end
    pieces, start = [], 0
    for end in ends:
        pieces.append(text[start:end])
        start = end
    if pieces:
        pieces[-1] += text[start:]  # what no token boundary reached (never cut text)
    return pieces


def compare_html(tokenizer, pieces: list[str], result: GenerationResult, diverge_at: int | None,
                 mask_name: str = "[gMASK]") -> str:
    """One side of a comparison: the prompt around its blanks, each generated token a span whose title
    gives its index and id; the token at `diverge_at` (a generated-token index) is outlined in red."""
    out, index = [], 0
    for k, piece in enumerate(pieces):
        out.append(f'<span style="color:#374151">{esc(piece)}</span>')
        if k == len(pieces) - 1:
            break
        if k >= len(result.blanks):
            out.append(f'<span style="color:#888">{esc(mask_name)}</span>')
            continue
        blank = result.blanks[k]
        spans = []
        for token, text in zip(blank.tokens, token_texts(tokenizer, blank)):
            style = ""
            if diverge_at is not None and index >= diverge_at:
                style = "outline:2px solid #dc2626" if index == diverge_at else "outline:1px dotted #dc2626"
            mark = ' data-diverges="true"' if index == diverge_at else ""
            spans.append(f'<span class="glmkit-gen-token" style="{style}"{mark} '
                         f'title="#{index} id {token}">{esc(text) if text else "&#8203;"}</span>')
            index += 1
        out.append(f'<span class="glmkit-blank" style="background:{BLANK_COLOUR};border:1px solid #d97706;'
                   f'border-radius:3px" title="blank {k + 1}">{"".join(spans)}</span>')
    return f'<div style="{BOX}">{"".join(out)}</div>'


def describe_id_divergence(tokenizer, a: list[int], b: list[int], at: int | None) -> str:
    """A sentence saying where two generations part (plain text)."""
    if at is None:
        return f"identical: the same {len(a)} generated tokens"

    def show(ids):
        if at >= len(ids):
            return "(ended)"
        return f"{tokenizer.id_to_piece(ids[at])!r} (id {ids[at]})"
    return f"first divergence at generated token #{at}: A {show(a)} vs B {show(b)}"


__all__ = ["generated_ids", "first_id_divergence", "token_texts", "compare_html", "describe_id_divergence"]
