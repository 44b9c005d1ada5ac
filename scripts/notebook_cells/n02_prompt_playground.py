"""Cells of notebooks/02-prompt-playground.ipynb."""
from __future__ import annotations

from .cells import md, code, config, teardown, START_CLUSTER

CELLS = [
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
    md("""\
## When you are done

**Run All** leaves the playground on screen and the engines running, so you can go on using it. The next cell
closes both, but only once you set `DONE = True` in it and run it. Do that before you shut the kernel
down: a kernel's exit asks ipyparallel to stop its engines, but on a busy machine it may be killed first and
leave engine processes behind."""),
    teardown("""\
DONE = False  # set to True and run this cell to close the playground and stop the engines
if DONE:
    playground.close()
    cluster.close()"""),
]
