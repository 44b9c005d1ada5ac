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
newline. A model often opens its answer with the separator itself (the demo model writes `"\\n\\n"` after
`Python:`): the template starts the answer after such leading whitespace, so a whitespace-only stop such as
`"\\n\\n"` ends the code, not the empty start (`completion` keeps the raw text, `answer` the code)."""),
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
