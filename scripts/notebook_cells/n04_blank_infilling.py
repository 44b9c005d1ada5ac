"""Cells of notebooks/04-blank-infilling.ipynb."""
from __future__ import annotations

from .cells import md, code, config, teardown

CELLS = [
    md("""\
# Blank infilling: `[MASK]`, `[sMASK]` and `[gMASK]`

GLM was trained to fill blanks. A prompt marks each blank with a mask, and generation writes the missing
text:

| mask | fills | typical use |
| --- | --- | --- |
| `[MASK]` | a short span: a word or a few | cloze questions, names in code |
| `[sMASK]` | a sentence | a missing sentence or line |
| `[gMASK]` | everything after it (left to right) | continuing text; appended when a prompt has no mask |

The demo model fits in this kernel, so this notebook runs it in-process with `glmkit.load()`; the cluster
has the same `generate()`. On a GPU node, change only the next cell.

The demo model was trained on Python's standard library (and English → German word pairs) with exactly
these masks, so it fills code blanks sensibly: `import os\nimport [MASK]` → `import threading`,
`def [MASK](self, other): return self.value + other.value` → `def _value(self, other)`. Prose is weaker:
`Return True if the [MASK] is empty, False otherwise.` → `second`, and a `[MASK]` fill may run on past the
blank (`threading\nimport` below): the model has only a rough sense of where a short span ends."""),
    config("""\
CONFIG = "glm-tiny"; CLUSTER = False; ENGINES = 2
# on a GPU node: CONFIG = "glm-130b"; CLUSTER = True; ENGINES = None (one engine per GPU)"""),
    code("""\
import pandas as pd

import glmkit
from glmkit.generate.blanks import MASK_PATTERN

if CLUSTER:
    from glmkit.serve.cluster import GLMCluster

    glm = GLMCluster(config=CONFIG, n=ENGINES)
    glm.start()
    glm.load(glm.config)
else:
    glm = glmkit.load(CONFIG)
tokenizer = glm.tokenizer
max_length = glm.config.model.max_sequence_length"""),
    md("""\
## One blank of each kind

A batch of prompts goes through in one call. `result.text` is the prompt with its blank filled, and each
`Blank` says where the fill sits in that text."""),
    code("""\
prompts = ["def [MASK](self, other):\\n    return self.value + other.value",
           "Tsinghua University is in Beijing. [sMASK] It was founded in 1911.",
           "The standard library module for regular expressions is [gMASK]",
           "A prompt with no mask is continued at the end:"]
results = glm.generate(prompts, max_new_tokens=12)
pd.DataFrame({"prompt": prompts,
              "mask": [(MASK_PATTERN.findall(p) or ["none: [gMASK] appended"])[0] for p in prompts],
              "fill": [r.blanks[0].text for r in results],
              "finish_reason": [r.finish_reason for r in results]})"""),
    md("""\
## Several blanks

Several masks (of one kind) are filled **left to right**: each fill is spliced into the prompt before the next
blank is generated, so later blanks see the earlier answers. Streamed events carry the blank's number."""),
    code("""\
events = []
result = glm.generate("import [MASK]\\nimport [MASK]\\n\\n\\ndef main():\\n    [MASK]", max_new_tokens=6,
                      on_text=events.append)
print(result.text)
pd.DataFrame([{"blank": number, "text": blank.text, "span": (blank.start, blank.end),
               "tokens": len(blank.tokens), "finish_reason": blank.finish_reason,
               "streamed pieces": sum(event.blank == number for event in events)}
              for number, blank in enumerate(result.blanks)])"""),
    md("""\
## How a prompt becomes tokens

GLM-130B's own `generate.py` builds the model input like this, and glmkit follows it:

1. the text between masks is tokenized, and each mask becomes its special token;
2. a prompt with no mask gets `[gMASK]` appended;
3. **unless the prompt ends with a mask, `eos` follows the text** — the model learnt that the context ends
   there;
4. `sop` (start of piece) starts the generated span.

`plan_prompt` shows the sequence before `sop`. Note that the text on each side of a mask is tokenized on
its own, as in the original: the text after a mask gets its own dummy-prefix `▁`, and a space before a mask
becomes a lone `▁` (see `05-tokenizer-quirks`)."""),
    code("""\
from glmkit.generate.blanks import plan_prompt


def glm_input(prompt):
    \"\"\"The token pieces GLM sees for a prompt, up to and including sop.\"\"\"
    plan = plan_prompt(tokenizer, prompt, max_length)
    return [tokenizer.id_to_piece(i) for i in plan.tokens + (tokenizer.sop_id,)]


for prompt in ["Paris is in [MASK].", "Paris is in [MASK]", "Paris is in"]:
    print(f"{prompt!r:24} -> {glm_input(prompt)}")"""),
    md("""\
## Positions and attention

Everything up to `sop` attends to everything else before `sop` (bidirectionally); from `sop` on, attention
is causal, as in a left-to-right model. Position ids count up through the context. Then the kinds differ:

- `[MASK]` / `[sMASK]`: every generated token is **pinned to the mask's position** — the model knows
  *where* in the text it is writing;
- `[gMASK]`: positions **keep counting** after the context, as in ordinary left-to-right generation.

The table shows the positions of the context tokens and of the first generated tokens
(`gen 1`, `gen 2`, …) for a short prompt of each kind."""),
    code("""\
from glmkit.generate.tokens import Context, next_positions, prefill_inputs


def positions(prompt, generated=3):
    \"\"\"Piece and position id of each context token, then the positions of the first generated tokens.\"\"\"
    plan = plan_prompt(tokenizer, prompt, max_length)
    tokens = plan.tokens + (tokenizer.sop_id,)
    mask_at = tokens.index(tokenizer.mask_ids[plan.mask_name])
    context = Context(tokens, None if plan.uses_gmask else mask_at)
    _, position_ids, _, _ = prefill_inputs([context], "cpu")
    rows = [(tokenizer.id_to_piece(t), int(p)) for t, p in zip(tokens, position_ids[0])]
    rows += [(f"gen {k}", int(next_positions([context], k)[0])) for k in range(1, generated + 1)]
    return pd.DataFrame(rows, columns=["token", "position"]).set_index("token").T


display(positions("Paris is in [MASK] today"))
positions("Paris is in")"""),
    md("""\
The attention mask of the `[MASK]` prompt (■: the row's token may attend to the column's token). The
context block is full; the `sop` row and column start the causal part."""),
    code("""\
plan = plan_prompt(tokenizer, "Paris is in [MASK] today", max_length)
tokens = plan.tokens + (tokenizer.sop_id,)
_, _, allowed, _ = prefill_inputs([Context(tokens, tokens.index(tokenizer.mask_id))], "cpu")
pieces = [tokenizer.id_to_piece(t) for t in tokens]
pd.DataFrame(allowed[0, 0].numpy(), index=pieces, columns=pieces).replace({True: "■", False: "·"})"""),
    md("""\
## Mistakes are caught before any compute

One kind of mask per prompt (GLM-130B fills one kind; the original code silently ignores the others), and a
mask must be spelt exactly — `[mask]` would otherwise be tokenized as ordinary text."""),
    code("""\
for bad in ["Paris is in [MASK], [gMASK]", "Paris is in [mask]."]:
    try:
        glm.generate(bad)
    except ValueError as error:
        print(f"{bad!r}: {error}")"""),
    teardown("""\
if CLUSTER:
    glm.close()  # stops the engines; the in-process model goes with the kernel"""),
]
