"""Cells of notebooks/03-few-shot.ipynb."""
from __future__ import annotations

from .cells import md, code, config, teardown, START_CLUSTER

CELLS = [
    md("""\
# Few-shot prompting

Show the model a few examples of a task and it continues the pattern for a new input. GLM continues a
prompt left to right (`[gMASK]` is appended), so it does not know the answer is over: a trained model writes
its answer and then **goes on inventing** new examples. *Stop sequences* end the answer where the next
example would begin. glmkit's few-shot templates build the prompt and derive the stop sequences for you.
Change only the next cell to use a GPU node.

**What the demo model can do here.** `glm-tiny` (7.9 M parameters) was trained on the Python standard library
plus a 5,000-word English → German dictionary from Debian's FreeDict (the most common words), written in
this notebook's `English: … German: …` layout (`docs/demo-model.md`). It has learnt the *pattern* — it
answers with German and a newline, so the stop sequences have real work to do — and it has learnt the
*dictionary*: 89 % of a sample of its words come back exactly, none of them shown in the prompt. What it
cannot do is translate a word it never saw translated: of 300 common words held out of training it gets 2 %
right. A 7.9 M-parameter model stores a vocabulary; it does not learn German. GLM-130B is the model for that."""),
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
prompt = translate.build_prompt("water")
print(prompt)
print(f"-- {len(cluster.tokenizer.encode(prompt))} tokens; stop sequences: {translate.stop_sequences()}")"""),
    md("""\
The derived stop sequences are `"\\nEnglish:"` (the next example's input prefix) and `"\\n"` (the
separator between examples, which no answer contains). Generation ends *before* a stop sequence, so it is
not part of the answer.

## With and without stop sequences

The same greedy call twice. Without stops, generation only ends at `max_new_tokens` (or when the model writes
its end token): the demo model answers `Wasser`, then carries on with a newline and an example it invents
(`English: …`, `German: …`) until the token limit. With the stops the answer ends at the first newline, and
`finish_reason` is `stop`."""),
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
whitespace), the raw completion, why it ended, tokens, seconds and the prompt.

First a few everyday words. The prompt shows only `cheese`, `the house`, `good morning` and `thank you very
much`; the rest the model has to know. It answers `Haus`, `Wasser`, `Baum`, `Mutter` and `Hund`; `the cat`
gets a wrong article and noun — the dictionary has `cat`, not `the cat`."""),
    code("""\
queries = ["house", "water", "tree", "mother", "dog", "the cat"]
answers = translate.run(cluster, queries, max_new_tokens=8)
answers[["query", "answer", "finish_reason", "tokens", "seconds"]]"""),
    md("""\
Now words **held out of the prompt**, not chosen by hand: every 30th of the 300 dictionary words that
`docs/demo-model/training_log.json` scored (an even sample of the 5,000 the model was trained on; none is one
of the prompt's examples). Most come back as the dictionary's German."""),
    code("""\
import json

from glmkit.config import REPO_ROOT

scored = json.loads((REPO_ROOT / "docs" / "demo-model" / "training_log.json").read_text())["result"]["translation"]


def dictionary_table(rows: list[dict]) -> pd.DataFrame:
    # The template's answers for these scored words, beside the dictionary's German.
    table = translate.run(cluster, [row["english"] for row in rows], max_new_tokens=8)
    table["dictionary"] = [row["german"] for row in rows]
    table["correct"] = [answer in row["translations"] for answer, row in zip(table["answer"], rows)]
    return table[["query", "answer", "dictionary", "correct", "finish_reason"]]


memory = scored["memory"]  # an even sample of the training dictionary, scored by the training run
known = dictionary_table(memory["rows"][::30])
print(f"demo model on all {memory['count']} sampled dictionary words: exact {memory['exact']:.1%}, "
      f"any dictionary translation {memory['accepted']:.1%}; here {known['correct'].sum()} of {len(known)} correct")
known"""),
    md("""\
Last the words **held out of training** as well: 300 common words (drawn, seeded, from the 3,000 most
common) that no training pair or phrase contains; here every 30th. The answers are German words cut by the
stop (or by the token limit), but almost never the right ones: nothing in its training tells the model what
`rain` is in German; the odd hit (`complete` → `völlig`) is a common word's usual partner.
With GLM-130B (`CONFIG = "glm-130b"`) the same cells score a real model."""),
    code("""\
unseen = dictionary_table(scored["rows"][::30])
print(f"demo model on all {scored['count']} held-out words: exact {scored['exact']:.1%}, "
      f"any dictionary translation {scored['accepted']:.1%}; here {unseen['correct'].sum()} of {len(unseen)} correct")
unseen"""),
    code("""\
without_stops = translate.run(cluster, queries, use_stops=False, max_new_tokens=8)
pd.DataFrame({"query": queries, "with stops": answers["completion"],
              "without stops": without_stops["completion"]})"""),
    md("""\
## English → Python

Code answers span several lines, so a newline cannot end them. The `en-python` template puts a blank line
between examples; its derived stops are `"\\n\\nEnglish:"`, `"\\nEnglish:"` and `"\\n\\n"` — never a single
newline. A model often opens its answer with whitespace or the separator itself: the template starts the
answer after such leading whitespace, so a whitespace-only stop such as `"\\n\\n"` ends the code, not the
empty start (`completion` keeps the raw text, `answer` the rest).

The demo model does **not** write code here: trained on translations in the `English: …` layout, it
answers this prompt with a word and an invented `German:` line that runs to the token limit (`reverse a
list` → `suitable`), or with junk the `"\\n\\n"` stop cuts short (`5`). The template works; the model is too
small for the task."""),
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
fewshot = FewShot(cluster, "en-de-translation", queries=["house", "according"], max_new_tokens=8)
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
    md("""\
## When you are done

**Run All** leaves the FewShot tool on screen and the engines running, so you can go on using it. The next cell
closes both, but only once you set `DONE = True` in it and run it. Do that before you shut the kernel
down: a kernel's exit asks ipyparallel to stop its engines, but on a busy machine it may be killed first and
leave engine processes behind."""),
    teardown("""\
DONE = False  # set to True and run this cell to close the FewShot tool and stop the engines
if DONE:
    fewshot.close()
    cluster.close()"""),
]
