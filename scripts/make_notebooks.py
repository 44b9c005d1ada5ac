"""Write the tutorial notebooks in notebooks/ from the cell texts below, without outputs.

    python scripts/make_notebooks.py           # (re)writes notebooks/*.ipynb
    python scripts/make_notebooks.py --check   # exit 1 if a committed notebook differs from what this writes

The cells live here so the notebooks stay clean (no outputs, no execution counts, stable cell ids) and
diff well. Conventions every notebook follows (tests/test_notebooks.py checks them):
- one config cell near the top, tagged `config`: a GPU user changes only that cell;
- GPU-only cells are tagged `gpu`, start with `# GPU only` and are guarded by `torch.cuda.is_available()`,
  so on a CPU they run and do nothing;
- a notebook that starts a cluster closes it in its last cell, tagged `teardown`.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"

KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


def md(text: str) -> tuple[str, str, list[str]]:
    return ("markdown", text, [])


def code(text: str, *tags: str) -> tuple[str, str, list[str]]:
    return ("code", text, list(tags))


def config(text: str) -> tuple[str, str, list[str]]:
    return code(text, "config")


def gpu(text: str) -> tuple[str, str, list[str]]:
    return code(text, "gpu")


def teardown(text: str) -> tuple[str, str, list[str]]:
    return code(text, "teardown")


START_CLUSTER = """\
from glmkit.cluster import GLMCluster

cluster = GLMCluster(config=CONFIG, n=ENGINES)
cluster.start()                 # engines up, one process group among them
cluster.load(cluster.config)    # each engine reads its own shard; returns cluster.status()"""

# ----- 01 ---------------------------------------------------------------------------------------------

QUICKSTART = [
    md("""\
# Quickstart: a resident GLM cluster

GLM-130B is too big for one GPU, so glmkit runs it on an [ipyparallel](https://ipyparallel.readthedocs.io)
cluster: **one engine per GPU**, each holding its tensor-parallel shard of the model between calls. This
notebook stays light: it tokenizes your prompt, sends it to every engine, and prints what rank 0 streams back.

On a laptop the same code runs the shipped demo model on two CPU engines. To use a GPU node, change only the
next cell."""),
    config("""\
CONFIG = "glm-tiny"; ENGINES = 2  # on a GPU node: CONFIG = "glm-130b"; ENGINES = None (one engine per GPU)"""),
    md("""\
**About the demo model.** `glm-tiny` is GLM-130B's architecture at toy size (7.9 M parameters), saved in
the official SwissArmyTransformer layout (2 shards) with a small tokenizer in icetk's conventions. It was
trained for 6.6 minutes on one H100 on the Python standard library (`docs/demo-model.md`), so it fills blanks
in Python and docstring English — `def [MASK](self, other): return self.value + other.value` becomes
`def _get_value(self, other): ...`, `import os\nimport [MASK]` becomes `import sys` — but knows no German
and rambles on long continuations. Everything around the text — masks, streaming, stop sequences,
stopping, timings, checkpoints — works exactly as with the real model, and that is what these notebooks show.

## Start the engines

`start()` launches the engines (one per GPU, or `ENGINES` CPU processes), gives each its rank and device,
and joins them in one `torch.distributed` process group (NCCL on GPUs, gloo on CPUs)."""),
    code("""\
import time

from glmkit.cluster import GLMCluster

cluster = GLMCluster(config=CONFIG, n=ENGINES)
started = time.perf_counter()
cluster.start()
print(f"{cluster.world_size} engines in one process group after {time.perf_counter() - started:.1f} s")"""),
    md("""\
## Load the model

Each engine reads **only its own shard** from the checkpoint (memory-mapped); a checkpoint saved with another
shard count is repacked on the fly (see `06-checkpoints`). `load()` shows a progress bar and returns the
cluster's status."""),
    code("""\
cluster.load(cluster.config)"""),
    md("""\
`status()` is one row per engine: its id, host and process, device, which shard it holds, how long loading
took and how much memory it uses. Ask for it whenever you like; it is cheap."""),
    code("""\
cluster.status()"""),
    md("""\
## Generate, streaming

`generate()` takes the same keywords as Hugging Face's `generate()` (`max_new_tokens`, `do_sample`,
`temperature`, `top_p`, `num_beams`, `stop`, …). With `on_text`, your callback gets each piece of text
while rank 0 generates (the engines send what they have every 50 ms) — here it is printed, so the line below
grows while the engines work.

A prompt without a mask gets `[gMASK]` appended: GLM continues the text left to right."""),
    code("""\
prompt = "English: cheese\\nGerman:"
result = cluster.generate(prompt, max_new_tokens=24,
                          on_text=lambda event: print(event.text, end="", flush=True))
print()
print(f"{result.num_generated_tokens} tokens, finish reason: {result.finish_reason}")"""),
    md("""\
The result holds the whole text with the blank filled in, each blank's text, span and tokens, and why
generation ended: `length` (ran out of `max_new_tokens`), `end` (the model wrote its end token), `stop`
(a stop sequence was reached) or `abort` (you stopped it)."""),
    code("""\
blank = result.blanks[0]
{"prompt": result.prompt, "completion": result.completion, "blank span": (blank.start, blank.end),
 "tokens": blank.tokens[:8], "finish_reason": result.finish_reason}"""),
    md("""\
`stream()` is the same call as an iterator of `TextEvent`s, for a batch of prompts at once. Each event says
which prompt (`index`) and which blank (`blank`) it belongs to; the finished results are in `last_results`."""),
    code("""\
prompts = ["[gMASK] one two three", "def [MASK](self):\\n    return self.name"]
streamed = {0: [], 1: []}
for event in cluster.stream(prompts, max_new_tokens=8):
    streamed[event.index].append(event.text)
for index, result in enumerate(cluster.last_results):
    print(f"{index}: {len(streamed[index])} streamed pieces -> {result.text!r}")"""),
    md("""\
## Stop a generation

`cluster.stop()` asks every engine to stop at the next token; they all stop at the same step, so no engine is
left waiting for the others and the cluster stays usable. It is what the widgets' Stop button calls;
interrupting the kernel (■) does the same, and so does `should_abort=` returning True. Here a timer stops a
long generation after half a second: the finish reason is `abort`."""),
    code("""\
import threading

threading.Timer(0.5, cluster.stop).start()
result = cluster.generate("Once upon a time", min_new_tokens=400, max_new_tokens=400)
print(f"finish reason: {result.finish_reason} after {result.num_generated_tokens} of 400 tokens")
cluster.generate("Still usable:", max_new_tokens=4).finish_reason"""),
    gpu("""\
# GPU only: memory and speed per GPU engine (skipped on CPU)
import torch

if torch.cuda.is_available() and cluster.config.device.startswith("cuda"):
    display(cluster.status()[["engine", "device", "shard", "gpu_allocated_gb", "gpu_peak_gb"]])
    started = time.perf_counter()
    timed = cluster.generate(["Tsinghua University is"] * 8, max_new_tokens=64, min_new_tokens=64)
    seconds = time.perf_counter() - started
    print(f"batch of 8 x 64 tokens in {seconds:.1f} s: {8 * 64 / seconds:.0f} tokens/s")"""),
    md("""\
## Shut down

`close()` stops every engine this cluster started. In a script, `with GLMCluster(config=...) as cluster:`
starts and loads the cluster and always closes it at the end of the block."""),
    teardown("""\
cluster.close()"""),
]

# ----- 02 ---------------------------------------------------------------------------------------------

PLAYGROUND = [
    md("""\
# Prompt playground

A widget for trying prompts and generation settings on the cluster: edit the prompt (several lines are
fine), pick a strategy and its settings, and press **Generate**. The output streams in; text filled into a
blank is highlighted. Change only the next cell to use a GPU node."""),
    config("""\
CONFIG = "glm-tiny"; ENGINES = 2  # on a GPU node: CONFIG = "glm-130b"; ENGINES = None (one engine per GPU)"""),
    code(START_CLUSTER),
    md("""\
## The playground

- the **prompt** box: `[MASK]` fills a short span, `[sMASK]` a sentence, `[gMASK]` (or no mask) continues
  at the end. The line below it counts the prompt's tokens as you type, with the ones GLM adds;
- **strategy**: greedy, sampling (temperature, top-k, top-p, seed) or beam search (beams, length penalty);
  settings that the strategy does not use are greyed out;
- **stop sequences**, one per line: `\\n` stands for a newline, `\\s` for a space;
- **Generate** runs in the background, so the notebook stays usable and **Stop** works at once;
  **Clear** empties the output;
- **show probabilities** colours each generated token by its probability (red unlikely, green likely);
  hover over a token for the five likeliest alternatives."""),
    code("""\
from glmkit.widgets import Playground

playground = Playground(cluster, prompt="def [MASK](self, other):\\n    return self.value + other.value",
                        max_new_tokens=16)
playground"""),
    md("""\
## Driving it from code

Everything the buttons do is a method: `set()` changes settings by name, `generate()` is the Generate
button (it returns at once), `wait()` waits for the run to finish and `result` is its `GenerationResult`.
Watch the widget above while this runs."""),
    code("""\
playground.prompt.value = "English: cheese\\nGerman: Käse\\nEnglish: house\\nGerman:"
playground.set(strategy="sampling", temperature=0.8, top_p=0.95, seed=42, stop=["\\n"], max_new_tokens=16)
playground.generate()
playground.wait(120)
playground.result.completion, playground.result.finish_reason"""),
    md("""\
With **show probabilities** on, each generated token gets a colour from its probability under the model
(before sampling settings are applied), and its tooltip lists the likeliest alternatives."""),
    code("""\
playground.set(strategy="greedy", stop="", min_new_tokens=1, show_probabilities=True)
playground.generate()
playground.wait(120)
top = playground.result.blanks[0].logprobs[0]
[(cluster.tokenizer.id_to_piece(token), round(logprob, 3)) for token, logprob in top.top]"""),
    md("""\
## History

Every finished run is a row of `history`: prompt, settings, output, why it ended, token counts and time."""),
    code("""\
playground.history"""),
    md("""\
Bad settings never reach the engines: the playground checks them first and says what is wrong in red at
the bottom of the tool (try a top-p of 0, or a `[mask]` in lower case)."""),
    teardown("""\
playground.close()
cluster.close()"""),
]

# ----- 03 ---------------------------------------------------------------------------------------------

FEW_SHOT = [
    md("""\
# Few-shot prompting

Show the model a few examples of a task and it continues the pattern for a new input. GLM continues a
prompt left to right (`[gMASK]` is appended), so it does not know the answer is over: a trained model writes
its answer and then **goes on inventing** new examples. *Stop sequences* end the answer where the next
example would begin. glmkit's few-shot templates build the prompt and derive the stop sequences for you.
Change only the next cell to use a GPU node."""),
    config("""\
CONFIG = "glm-tiny"; ENGINES = 2  # on a GPU node: CONFIG = "glm-130b"; ENGINES = None (one engine per GPU)"""),
    code(START_CLUSTER),
    md("""\
## English → German

The shipped template `en-de-translation` holds an instruction, four `English: … German: …` pairs and the
prefixes. `build_prompt()` gives the exact prompt for a query. It ends with `German:` and no space:
SentencePiece glues a space to the following word, so a trailing space would leave a lone `▁` token that
no example showed (see `05-tokenizer-quirks`)."""),
    code("""\
import pandas as pd

from glmkit.widgets import FewShot, load_template

translate = load_template("en-de-translation")
prompt = translate.build_prompt("good night")
print(prompt)
print(f"-- {len(cluster.tokenizer.encode(prompt))} tokens; stop sequences: {translate.stop_sequences()}")"""),
    md("""\
The derived stop sequences are `"\\nEnglish:"` (the next example's input prefix) and `"\\n"` (the
separator between examples, which no answer contains). Generation ends *before* a stop sequence, so it is
not part of the answer.

## With and without stop sequences

The same greedy call twice. Without stops, generation only ends at `max_new_tokens` (or when the model writes
its end token): a trained model answers, then carries on with a newline and more lines in the pattern of
the examples (`English: …`, `German: …`). With the stops the answer ends at the first newline, and `finish_reason` is `stop`
whenever a stop sequence cut it. (Should the demo model write no newline at all, both runs end at `length`
with the same text.)"""),
    code("""\
runaway = cluster.generate(prompt, max_new_tokens=12)
stopped = cluster.generate(prompt, max_new_tokens=12, stop=translate.stop_sequences())
pd.DataFrame({"stop sequences": ["none", repr(translate.stop_sequences())],
              "completion": [runaway.completion, stopped.completion],
              "finish_reason": [runaway.finish_reason, stopped.finish_reason],
              "tokens": [runaway.num_generated_tokens, stopped.num_generated_tokens]})"""),
    md("""\
## Many queries into a table

`FewShotTemplate.run(backend, queries)` answers each query in turn (with the derived stops unless
`use_stops=False`) and returns a DataFrame: the query, the answer (the completion without surrounding
whitespace), the raw completion, why it ended, tokens, seconds and the prompt."""),
    code("""\
queries = ["the cat", "good night", "a glass of water"]
answers = translate.run(cluster, queries, max_new_tokens=8)
answers[["query", "answer", "finish_reason", "tokens", "seconds"]]"""),
    code("""\
without_stops = translate.run(cluster, queries, use_stops=False, max_new_tokens=8)
pd.DataFrame({"query": queries, "with stops": answers["completion"],
              "without stops": without_stops["completion"]})"""),
    md("""\
## English → Python

Code answers span several lines, so a newline cannot end them. The `en-python` template puts a blank line
between examples; its derived stops are `"\\n\\nEnglish:"`, `"\\nEnglish:"` and `"\\n\\n"` — never a single
newline."""),
    code("""\
to_python = load_template("en-python")
print(to_python.build_prompt("reverse a list"))
print(f"-- stop sequences: {to_python.stop_sequences()}")"""),
    code("""\
code_answers = to_python.run(cluster, ["reverse a list", "the sum of a list of numbers"], max_new_tokens=16)
code_answers[["query", "answer", "finish_reason", "tokens"]]"""),
    md("""\
## The FewShot widget

The same templates as an editor: pick a shipped template (or load your own YAML), edit the instruction,
prefixes, separators and examples, and see the exact prompt with its invisible characters (`↵` newline,
`·` trailing space), its tokens and the stop sequences update as you type. Put one query per line and press
**Run**: the answers fill a table, row by row. **Save** writes the template as YAML."""),
    code("""\
fewshot = FewShot(cluster, "en-de-translation", queries=["the cat", "good night"], max_new_tokens=8)
fewshot"""),
    md("""\
`run()` is the Run button; `results` is the table as a DataFrame once the run is over."""),
    code("""\
fewshot.run()
fewshot.wait(300)
fewshot.results[["query", "answer", "finish_reason", "tokens"]]"""),
    md("""\
A template is plain data. `fewshot.template` is the edited template; this is what **Save** writes:"""),
    code("""\
print(fewshot.template.to_yaml())"""),
    teardown("""\
fewshot.close()
cluster.close()"""),
]

# ----- 04 ---------------------------------------------------------------------------------------------

INFILLING = [
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

The demo model was trained on Python's standard library with exactly these masks, so it fills code blanks
sensibly: `import os\nimport [MASK]` → `import sys`, `Return True if the [MASK] is empty, False otherwise.`
→ `iterator`."""),
    config("""\
CONFIG = "glm-tiny"; CLUSTER = False; ENGINES = 2
# on a GPU node: CONFIG = "glm-130b"; CLUSTER = True; ENGINES = None (one engine per GPU)"""),
    code("""\
import pandas as pd

import glmkit
from glmkit.infilling import MASK_PATTERN

if CLUSTER:
    from glmkit.cluster import GLMCluster

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
from glmkit.infilling import plan_prompt


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
from glmkit.generation import Context, next_positions, prefill_inputs


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

# ----- 05 ---------------------------------------------------------------------------------------------

TOKENIZER = [
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

from glmkit import GLMTokenizer, load_config
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
## Token counts

Characters per token vary a lot with the kind of text — worth knowing when a prompt must fit the model's
maximum length."""),
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

# ----- 06 ---------------------------------------------------------------------------------------------

CHECKPOINTS = [
    md("""\
# Checkpoints: inspect and repack shard counts

GLM-130B is released as 8 tensor-parallel SwissArmyTransformer shards (`mp_rank_00_model_states.pt` …
`mp_rank_07_…`), for 8 GPUs. With 4 GPUs you need 4 shards; `glmkit.checkpoint` repacks a checkpoint to any
shard count that divides the heads, the vocabulary and the MLP width, in the official layout, so the original
GLM-130B code can load the result too. The same is on the command line: `glmkit inspect DIR`,
`glmkit repack SRC DST --shards N --config NAME`.

This notebook repacks the demo checkpoint 2 → 1 → 4 shards and checks that the model is unchanged. For
GLM-130B change only the next cell (each copy of the checkpoint is about 260 GB)."""),
    config("""\
CONFIG = "glm-tiny"; REPACK_TO = (1, 4); WORKDIR = None  # None: a temporary folder, deleted at the end
# on a GPU node: CONFIG = "glm-130b"; REPACK_TO = (4,); WORKDIR = "/data/glmkit-repacks"
"""),
    code("""\
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from glmkit import load_config
from glmkit.checkpoint import (expected_shapes, inspect_checkpoint, load_rank_state_dict, read_shard,
                               repack_checkpoint)
from glmkit.tensor_parallel import shard_style

config = load_config(CONFIG)
work = Path(WORKDIR) if WORKDIR else Path(tempfile.mkdtemp(prefix="glmkit-repack-"))
work.mkdir(parents=True, exist_ok=True)
config.model"""),
    md("""\
## What is in a checkpoint folder

`latest` names the iteration folder; it holds one `mp_rank_XX_model_states.pt` per tensor-parallel rank,
each a torch-pickled `{"module": state_dict}`. `inspect_checkpoint` reads no tensors."""),
    code("""\
def describe(folder):
    \"\"\"The shard files of a checkpoint folder, with their sizes.\"\"\"
    info = inspect_checkpoint(folder)
    print(f"{info.dir}: iteration {info.iteration!r}, {info.num_shards} shard(s)")
    return pd.DataFrame({"file": [p.name for p in info.shard_paths],
                         "MB": [round(p.stat().st_size / 2**20, 2) for p in info.shard_paths]})


describe(config.checkpoint)"""),
    md("""\
## How each parameter is split

The parameter names are SAT's. One table in `glmkit.tensor_parallel` says how each is split across ranks —
the same table drives loading, repacking and the live tensor-parallel model:

- `vocab` / `column`: split along the output rows (whole attention heads stay together);
- `column_glu`: GeGLU's two halves are split separately, so each rank keeps matching halves;
- `row`: split along the input columns (the layer's output is summed over ranks);
- `replicate`: every rank holds the whole tensor (LayerNorms, biases of row-split layers).

Per-rank shapes for each shard count used here (layer 0 stands for every layer):"""),
    code("""\
shard_counts = sorted({1, inspect_checkpoint(config.checkpoint).num_shards, *REPACK_TO})
shapes = {n: expected_shapes(config.model, n) for n in shard_counts}
names = [name for name in shapes[1] if ".layers." not in name or ".layers.0." in name]
pd.DataFrame({"style": [shard_style(name) for name in names],
              **{f"{n} shard(s)": [shapes[n][name] for name in names] for n in shard_counts}},
             index=names)"""),
    md("""\
The files hold exactly those shapes. Shards are read memory-mapped and only as safe tensors (no arbitrary
unpickling), so looking at shapes costs almost nothing even for GLM-130B:"""),
    code("""\
def file_shapes(folder, names=names):
    \"\"\"Shapes of some parameters in every shard file of a checkpoint (one column per rank).\"\"\"
    info = inspect_checkpoint(folder)
    shards = [read_shard(path) for path in info.shard_paths]
    return pd.DataFrame({f"rank {rank}": [tuple(shard[name].shape) for name in names]
                         for rank, shard in enumerate(shards)}, index=names)


original = inspect_checkpoint(config.checkpoint)
assert all(file_shapes(config.checkpoint)[f"rank {r}"].tolist() == [shapes[original.num_shards][n] for n in names]
           for r in range(original.num_shards))
file_shapes(config.checkpoint)"""),
    md("""\
## Repack

`repack_checkpoint(src, dst, n, config)` writes one target shard at a time, reading only the (memory-mapped)
source shards it overlaps, so peak memory stays near one shard. Each repack below starts from the previous
result: 2 → 1 → 4."""),
    code("""\
folders = [config.checkpoint]
for n in REPACK_TO:
    target = work / f"{n}-shards"
    started = time.perf_counter()
    repack_checkpoint(folders[-1], target, n, config.model)
    print(f"{inspect_checkpoint(folders[-1]).num_shards} -> {n} shard(s) in {time.perf_counter() - started:.2f} s")
    folders.append(target)
describe(folders[-1])"""),
    code("""\
file_shapes(folders[-1])"""),
    md("""\
## Is it the same model?

A rank of a tensor-parallel model can load from a checkpoint of any shard count; glmkit reshards on the fly.
Rank by rank, the 2-way state dicts loaded from the original and from the repacked copy must be identical:"""),
    code("""\
for rank in range(2):
    a = load_rank_state_dict(config.checkpoint, config.model, rank, 2)
    b = load_rank_state_dict(folders[-1], config.model, rank, 2)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    print(f"rank {rank} of 2: {len(a)} tensors, identical")
    del a, b"""),
    md("""\
And the logits: the model loaded (in this kernel) from the original and from the last repacked copy gives
bit-for-bit the same next-token logits for a prompt. A model as big as GLM-130B does not fit one process:
the cell after this one checks it on the cluster instead."""),
    code("""\
import glmkit
from glmkit.generation import Context, prefill_inputs
from glmkit.infilling import plan_prompt


def logits(checkpoint, prompt="def [MASK](self, other):\\n    return self.value + other.value"):
    \"\"\"Next-token logits at the sop that starts the blank, for the model in `checkpoint`.\"\"\"
    glm = glmkit.load(config.replace(checkpoint=checkpoint))
    plan = plan_prompt(glm.tokenizer, prompt, config.model.max_sequence_length)
    context = Context(plan.tokens + (glm.tokenizer.sop_id,), plan.tokens.index(glm.tokenizer.mask_id))
    ids, positions, allowed, _ = prefill_inputs([context], glm.model.transformer.word_embeddings.weight.device)
    with torch.inference_mode():
        return glm.model(ids, positions, allowed)[0, -1].float().cpu()  # (vocab,)


if config.model.num_parameters() < 2e9:
    before, after = logits(config.checkpoint), logits(folders[-1])
    print(f"{len(before)} logits; identical: {torch.equal(before, after)}; "
          f"largest difference {(before - after).abs().max().item():.3g}")
    assert torch.equal(before, after)
else:
    print("too large for one process: see the GPU cell below")"""),
    gpu("""\
# GPU only: the same check on the cluster (each engine loads its shard), for models too big for one GPU
import torch

if torch.cuda.is_available() and config.device.startswith("cuda"):
    from glmkit.cluster import GLMCluster

    prompt = "Tsinghua University is located in [MASK]."
    with GLMCluster(config=config) as cluster:
        before = cluster.generate(prompt, max_new_tokens=8, top_logprobs=5)
        cluster.load(config.replace(checkpoint=folders[-1]))
        after = cluster.generate(prompt, max_new_tokens=8, top_logprobs=5)
    pairs = list(zip(before.blanks[0].logprobs, after.blanks[0].logprobs))
    assert before.text == after.text and all(a.token == b.token for a, b in pairs)
    assert all(abs(x - y) < 1e-3 for a, b in pairs for (_, x), (_, y) in zip(a.top, b.top))
    print(f"same {len(pairs)} tokens and top-5 log probabilities from both checkpoints: {after.text!r}")"""),
    md("""\
## Clean up

The repacked copies were written to a temporary folder (unless you set `WORKDIR`); this removes them."""),
    teardown("""\
if WORKDIR is None:
    shutil.rmtree(work)"""),
]

TOKENOMICS = [
    md("""\
# 07 · Tokenomics: what a token costs you

The seed's question: is self-hosting GLM-130B cheaper than an API? Its answer came from one hand-measured
number — about 100 tokens per 5 s on 8×A100 at about $10/hour. This notebook redoes that arithmetic, then the
same with measured throughput: the GPU numbers recorded in `docs/benchmarks.md`, and a measurement of your own
machine with `glmkit bench`. Batching is what changes the answer: a decode step streams the weights once for
the whole batch."""),
    config("""\
CONFIG = "glm-tiny"; LAYERS = None; BATCHES = (1, 4)  # on a GPU node: CONFIG = "glm-130b"; LAYERS = 12; BATCHES = (1, 8, 32)"""),
    code("""\
import tempfile
from pathlib import Path

import pandas as pd

from glmkit import tokenomics as tk
from glmkit.widgets import TokenomicsCalculator"""),
    md("""\
## The seed's arithmetic

$10/hour for 5 s is about $0.014 per 100 tokens; the API sold 100 tokens for $0.002 ($0.02 per 1K). And
$200k of hardware buys about 10 billion API tokens."""),
    code("""\
tk.seed_arithmetic().style.format({"value": "{:,.4g}"})"""),
    md("""\
## Recorded GPU throughput

`docs/benchmarks.md` holds the numbers measured on the GPU machines (card, GPUs, precision, batch, ms per
decode step). The calculator below prices them: switch between a cloud node and an owned one, change the
prices, and the table, the break-even batch and the plot follow."""),
    code("""\
recorded = tk.read_benchmarks()
recorded[["card", "gpus", "model", "precision", "batch", "ms_per_token", "tokens_per_s"]]"""),
    code("""\
calculator = TokenomicsCalculator(recorded, model="glm-130b shape, 12 layers (random)",
                                  dollars_per_hour=10.0, api_dollars_per_1k=0.02)
calculator"""),
    md("""\
Read it as: at batch 1 a GPU spends the whole weight-streaming time on one token, so the price per token is
high; at batch 32 the same step yields 32 tokens. The break-even batch is where the line crosses the API's."""),
    code("""\
node = tk.CloudNode(dollars_per_hour=10.0)
table = tk.cost_by_batch(recorded, node, api_dollars_per_1k=0.02, model="glm-130b shape, 12 layers (random)")
print(tk.break_even_by_setup(table, node, api_dollars_per_1k=0.02).to_string(index=False))
table[["precision", "gpus", "batch", "tokens_per_s", "dollars_per_1m", "self_over_api"]]"""),
    md("""\
## Your own measurement

`glmkit bench` measures this machine: decode milliseconds per step at each batch size, through the same
generation path the cluster uses, on random weights of the config's architecture. On the CPU demo model the
numbers are tiny-model numbers; on a GPU node set the config cell to `glm-130b` with `LAYERS = 12` (a slice
of the model that fits one GPU: per-layer cost scales, so 70 layers cost about 70/12 as much per step)."""),
    code("""\
from glmkit.bench import BenchOptions, default_device, resolve_config, run_bench

device = default_device()  # the first GPU when there is one
name, config, _ = resolve_config(CONFIG, LAYERS)
result = run_bench(BenchOptions(config=config, config_name=name, dtype="fp32" if device == "cpu" else "fp16",
                                device=device, batches=BATCHES, prompt_tokens=16, new_tokens=8, repeats=1))
measured = pd.DataFrame([{"card": result["device"], "gpus": 1, "model": name, "precision": result["dtype"],
                          "batch": b["batch"], "ms_per_token": b["ms_per_token"], "tokens_per_s": b["tokens_per_s"]}
                         for b in result["batches"]])
tk.cost_table(measured, tk.CloudNode(dollars_per_hour=1.0), api_dollars_per_1k=0.02)"""),
    md("""\
## Export

Every table here is a pandas DataFrame: `to_csv` it for a spreadsheet."""),
    code("""\
out = Path(tempfile.mkdtemp()) / "cost_by_batch.csv"
print("wrote", calculator.to_csv(out), "with", len(calculator.table), "rows")"""),
]

NOTEBOOKS = {
    "01-quickstart.ipynb": QUICKSTART,
    "02-prompt-playground.ipynb": PLAYGROUND,
    "03-few-shot.ipynb": FEW_SHOT,
    "04-blank-infilling.ipynb": INFILLING,
    "05-tokenizer-quirks.ipynb": TOKENIZER,
    "06-checkpoints.ipynb": CHECKPOINTS,
    "07-tokenomics.ipynb": TOKENOMICS,
}


def build(cells: list[tuple[str, str, list[str]]]) -> nbformat.NotebookNode:
    """A notebook without outputs; cell ids are stable (c01, c02, …) so regenerating changes nothing."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    for number, (kind, text, tags) in enumerate(cells, start=1):
        source = textwrap.dedent(text).strip("\n")
        metadata = {"tags": tags} if tags else {}
        if kind == "markdown":
            cell = nbformat.v4.new_markdown_cell(source, metadata=metadata)
        else:
            cell = nbformat.v4.new_code_cell(source, metadata=metadata)
        cell.id = f"c{number:02d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render(cells) -> str:
    """The .ipynb text of a notebook, as written to disk."""
    return nbformat.writes(build(cells)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare with the files in notebooks/")
    args = parser.parse_args(argv)
    NOTEBOOK_DIR.mkdir(exist_ok=True)
    stale = []
    for name, cells in NOTEBOOKS.items():
        path = NOTEBOOK_DIR / name
        text = render(cells)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"out of date with scripts/make_notebooks.py: {', '.join(stale)}; "
              f"run python scripts/make_notebooks.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
