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
  hover over a token for the five likeliest alternatives; a table under the output lists every token with
  its probability and alternatives, next to the token ids (select and copy them);
- **View code** shows the `glmkit` Python call and the `glmkit generate` command line for the current
  prompt and settings, ready to copy;
- **presets**: type a name and press **Save preset** to keep the settings in a YAML file
  (`~/.glmkit/presets.yaml` unless you change the path); pick one and press **Load preset** to get them back;
- **compare** runs the prompt a second time — under a saved preset's settings, or on a second backend given
  as `Playground(cluster, second_backend=...)` (say the same model at another precision) — and shows both
  side by side, with the first generated token where they part outlined in red;
- **history**, at the bottom: every run, to load back (prompt, settings and output) with **Load run**."""),
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
playground.prompt.value = "English: cheese\\nGerman: Käse\\nEnglish: tree\\nGerman:"
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
The same numbers as a table, one row per generated token (the widget shows it under the output):"""),
    code("""\
playground.token_table_frame()"""),
    md("""\
## View code, presets and compare mode

**View code** opens a box with the Python call and the command line that repeat what the playground would
run now. `code()` returns the same two strings."""),
    code("""\
playground.view_code.value = True
python, command = playground.code()
print(command)"""),
    md("""\
Save the current settings as a preset, change them, and compare the two: A runs with the settings in the
controls, B with the preset's. The presets file is normally `~/.glmkit/presets.yaml`; this tutorial writes
to a scratch file so that running it leaves your own presets alone."""),
    code("""\
import tempfile
from pathlib import Path

from IPython.display import HTML

playground.presets_bar.path.value = str(Path(tempfile.mkdtemp()) / "presets.yaml")
playground.set(strategy="greedy", stop="", min_new_tokens=0, max_new_tokens=12, show_probabilities=False)
playground.save_preset("greedy-12")
playground.set(strategy="sampling", temperature=1.0, top_p=0.9, seed=1)
playground.compare.value = True
playground.compare_settings.value = "greedy-12"
playground.generate()
playground.wait(120)
print(Path(playground.presets_bar.path.value).read_text())
HTML(playground.divergence_line.value)"""),
    code("""\
playground.compare.value = False  # back to one output
playground.load_preset("greedy-12")"""),
    md("""\
## History

Every finished run is a row of `history`: prompt, settings, output, why it ended, token counts and time. The
history list at the bottom of the widget loads any of them back; so does `playground.load_run(row)`."""),
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
