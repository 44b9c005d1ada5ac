"""The escapes people type for invisible characters: `\\n` newline, `\\t` tab, `\\s` space, `\\\\` backslash.

One implementation for every place a user types a stop sequence or a separator: the `glmkit generate --stop`
flag and the Playground and FewShot boxes accept exactly the same text.
"""
from __future__ import annotations

import re

_ESCAPES = {"n": "\n", "t": "\t", "s": " ", "\\": "\\"}


def unescape(text: str) -> str:
    """Turn the two characters `\\n` into a newline (also `\\t`, `\\s` a space, `\\\\`); others stay."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), text)


def escape_text(text: str) -> str:
    """Inverse of `unescape`: backslashes, newlines and tabs escaped, spaces at either end as `\\s`."""
    body = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
    core = body.strip(" ")
    if not core:
        return "\\s" * len(body)
    lead = len(body) - len(body.lstrip(" "))
    trail = len(body) - len(body.rstrip(" "))
    return "\\s" * lead + core + "\\s" * trail
