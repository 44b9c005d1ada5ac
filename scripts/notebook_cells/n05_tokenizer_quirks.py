"""Cells of notebooks/05-tokenizer-quirks.ipynb."""
from __future__ import annotations

from .cells import md, code, config

CELLS = [
    md("""\
# Tokenizer quirks

GLM-130B's tokenizer (icetk's `ice_text.model`, a SentencePiece model) has habits that change what the model
sees: where spaces go, how newlines and indentation are written, what happens to characters it has no piece
for. The **TokenInspector** shows a text as coloured tokens — neighbouring tokens alternate colours, and
hovering over one shows its id, piece and kind — with the invisible made visible.

Only the tokenizer is needed, so no model is loaded here. The demo tokenizer follows icetk's conventions with a
much smaller vocabulary; to see the real one, change the next cell (icetk downloads `ice_text.model` into
`~/.icetk_models` the first time)."""),
    config("""\
CONFIG = "glm-tiny"  # with GLM-130B's tokenizer: CONFIG = "glm-130b"
"""),
    code("""\
import pandas as pd

from glmkit import GLMTokenizer

from glmkit import load_config
from glmkit.widgets import TokenInspector

tokenizer = GLMTokenizer.load(load_config(CONFIG).tokenizer)
tokenizer"""),
    md("""\
## Trailing spaces: `German:` vs `German: `

A SentencePiece word piece *starts* with its space (`▁Haus` is " Haus"). A prompt ending in `German: ` ends
on a lone `▁` token — one the model rarely saw before a word, since the space normally belongs to the word
that follows. Leave the space out and let the model write `▁Haus`. The inspector compares two texts and
outlines the first token where they part.

(The demo tokenizer's small vocabulary splits most English words into short pieces and often has no
`▁word` piece, so lone `▁` tokens are common with it; GLM-130B's has whole-word pieces such as `▁Haus`.)"""),
    code("""\
TokenInspector(tokenizer, "English: house\\nGerman:", compare="English: house\\nGerman: ")"""),
    md("""\
## Leading spaces and the dummy prefix

SentencePiece puts a space in front of the text (the *dummy prefix*, a dimmed `▁`: it stands for no
character of your text), so `cheese` is tokenized as if it were ` cheese`. A space of your own comes on top
of it: ` cheese` is tokenized as two spaces and the word, and its tokens differ from the first one on. Untick
*add the dummy prefix* to see a text tokenized as it would be in the middle of a prompt."""),
    code("""\
TokenInspector(tokenizer, "cheese", compare=" cheese")"""),
    md("""\
## Newlines and code indentation

GLM-130B's tokenizer writes a newline as the piece `<n>` (shown `↵`), a tab as `<|tab|>` (→) and a run of
2–80 spaces as one `<|blank_N|>` piece (▁▁▁▁). So four-space indentation is a single token, and the same code
indented with a tab is a different token sequence."""),
    code("""\
TokenInspector(tokenizer, "def area(r):\\n    return 3.14 * r * r\\n",
               compare="def area(r):\\n\\treturn 3.14 * r * r\\n")"""),
    code("""\
TokenInspector(tokenizer, "one\\ntwo", compare="one\\n\\ntwo")"""),
    md("""\
## Chinese

GLM-130B is bilingual: its tokenizer has pieces for common Chinese words. The demo tokenizer has no Chinese
pieces, so every character falls back to its three UTF-8 bytes (next section): three tokens each."""),
    code("""\
TokenInspector(tokenizer, "清华大学在北京。", compare="Tsinghua University is in Beijing.")"""),
    md("""\
## Byte fallback and emoji

A character with no piece of its own is written as its UTF-8 bytes, one token per byte (`<0xF0>`, …), shown in
dashed boxes; the last byte's box shows the character. An emoji is usually four byte tokens."""),
    code("""\
TokenInspector(tokenizer, "GLM 🤖 likes tea 🍵!", compare="GLM likes tea!")"""),
    md("""\
## Special tokens

Masks are special tokens (red). Written exactly — `[MASK]`, `[sMASK]`, `[gMASK]` — they become one token;
anything else, such as `[mask]`, is ordinary text."""),
    code("""\
TokenInspector(tokenizer, "The capital of [MASK] is Paris.", compare="The capital of [mask] is Paris.")"""),
    md("""\
## Text that does not survive tokenizing

Because the tokenizer *writes* whitespace as pieces, the same characters typed in a text are read as that
whitespace: a literal `<n>` is a newline to the model, `<|tab|>` a tab, `<|blank_4|>` four spaces, and `▁`
(SentencePiece's space mark) a space. The inspector underlines such text and says what the model will see;
the playground's token line warns about it too."""),
    code("""\
TokenInspector(tokenizer, "Write <n> for a newline, <|tab|> for a tab.\\nReal newline; a ▁ mark.")"""),
    md("""\
## Token ids and a selection

Each side shows its token ids, ready to select and copy. The **selection** slider picks a character range
of the first text (its two ends can also be typed); the line under it counts the characters and the tokens
that touch the range. `select(start, end)` does the same from code."""),
    code("""\
inspector = TokenInspector(tokenizer, "def area(r):\\n    return 3.14 * r * r\\n")
inspector.select(13, 17)  # the four spaces of indentation: one <|blank_4|> token"""),
    code("""\
inspector"""),
    md("""\
## Token counts

Characters per token vary a lot with the kind of text — worth knowing when a prompt must fit the model's
maximum length. (With two tokenizers loaded, `TokenInspector(tokenizer, text, second_tokenizer=other)` shows
one text under both, side by side: tick *compare with the second tokenizer*.)"""),
    code("""\
texts = {"English prose": "The quick brown fox jumps over the lazy dog.",
         "German": "Der schnelle braune Fuchs springt über den faulen Hund.",
         "Python, spaces": "def f(x):\\n    if x:\\n        return 1\\n    return 0\\n",
         "Python, tabs": "def f(x):\\n\\tif x:\\n\\t\\treturn 1\\n\\treturn 0\\n",
         "Chinese": "清华大学在北京。",
         "emoji": "🤖🍵🎉"}
counts = pd.DataFrame({"characters": {name: len(text) for name, text in texts.items()},
                       "tokens": {name: len(tokenizer.encode(text)) for name, text in texts.items()}})
counts["characters per token"] = (counts["characters"] / counts["tokens"]).round(2)
counts"""),
    md("""\
## As a DataFrame

`to_dataframe()` is one row per token: id, piece, the characters it covers and its kind (`text`,
`dummy_prefix`, `newline`, `tab`, `blank`, `byte`, `special`, …)."""),
    code("""\
inspector = TokenInspector(tokenizer, "if x:\\n\\treturn '🤖'")
inspector.to_dataframe()"""),
]
