"""Cells of notebooks/09-evaluate.ipynb."""
from __future__ import annotations

from .cells import md, code, config, teardown, START_CLUSTER

CELLS = [
    md("""\
# Evaluating a model on tasks

`glmkit.evaluation.evaluate(backend, task, ...)` runs a task the way GLM-130B's own evaluation does:
**multiple choice** by the log-likelihood of each choice (the choice fills the `[MASK]` of the context, or
follows it), **generation** by exact match and F1. It reports accuracy per template and k with a 95 %
interval, keeps one row per example (prompt, scores, prediction, gold), caches what it computed, and stops
cleanly when asked. The same tasks also run under **lm-evaluation-harness** through `GLMKitLM`, lm-eval's
model interface over a glmkit backend. Change only the next cell to use a GPU node.

**What the demo model can do here.** `glm-tiny` (7.9 M parameters) was trained on the Python standard library
and English → German word pairs (`docs/demo-model.md`). The shipped tasks ask standard-library facts
(`scripts/make_eval_tasks.py` writes them by fixed rules from Python 3.11's sources): which module a name is
imported from, a method's first parameter, the name an `import` brings in. The demo model knows some of
them, far from all: enough to beat chance clearly, which is what an evaluation must be able to show."""),
    config("""\
CONFIG = "glm-tiny"; ENGINES = 2  # on a GPU node: CONFIG = "glm-130b"; ENGINES = None (one engine per GPU)"""),
    code(START_CLUSTER),
    md("""\
## A shipped task

A task is a table of examples: `inputs` (a `[MASK]` in it is the blank the answer fills), `choices` and
`label` for multiple choice, `targets` for generation. `load_task` reads GLM-130B's task YAMLs and jsonl files
(and CSV files or DataFrames), checking every row; a bad row fails naming the file, line and field."""),
    code("""\
import pandas as pd

from glmkit.evaluation import EvalCache, evaluate, from_frame, load_task

mc = load_task("stdlib-mc")
print(mc)
mc.rows[["group", "inputs", "choices", "label"]].head(3)"""),
    md("""\
## Accuracy with its interval, at k = 0 and 1

`shots` are the k demonstrations before each prompt: other examples of the same group with their blank
filled in, drawn with `seed` (never the example itself). `limit` keeps the first examples of each group,
here 40, so the CPU run takes a minute; leave it out for the whole task. Every prompt is built and checked
against the model's length before anything runs. The summary gives each accuracy a 95 % Wilson interval and
the accuracy of guessing (`chance`); the results go into `cache`, so asking again costs nothing."""),
    code("""\
cache = EvalCache()  # EvalCache("eval-cache/") keeps them on disk across sessions
result = evaluate(cluster, mc, shots=[0, 1], limit=40, cache=cache)
result.summary[["group", "template", "k", "n", "chance", "accuracy", "accuracy_low", "accuracy_high"]]"""),
    code("""\
for _, row in result.summary.iterrows():
    verdict = "beats chance" if row["accuracy_low"] > row["chance"] else "does not beat chance"
    print(f"{row['group']:>13} k={row['k']}: accuracy {row['accuracy']:.2f} "
          f"[{row['accuracy_low']:.2f}, {row['accuracy_high']:.2f}] against chance {row['chance']:.2f}: {verdict}")"""),
    md("""\
## Where it fails

`result.rows` holds every example: the prompt exactly as scored, each choice's log-probability (also per
token and per character, lm-eval's `acc_norm` style), the prediction and the gold answer. The failures are
the rows that are not `correct`:"""),
    code("""\
rows = result.rows
failures = rows[~rows["correct"]]
print(f"{len(failures)} of {len(rows)} wrong")
failures[["group", "k", "prompt", "prediction", "gold", "logprobs"]].head(5)"""),
    md("""\
## Templates

A template lays out the same examples another way (`glmkit.widgets.FewShotTemplate`, as the few-shot
notebook edits them). The shipped stdlib tasks hold a `[MASK]` in their code, so only their own format fits
them; templates are for tasks whose inputs are plain text. Here a small English → German multiple-choice
task made from a DataFrame (words the demo model saw paired in training), under the shipped
`en-de-translation` template and the same template without its instruction line. `result.templates` is
GLM-130B's report over templates: the best, the median and the average."""),
    code("""\
import dataclasses

from glmkit.widgets import load_template

pairs = [("house", "Haus"), ("water", "Wasser"), ("tree", "Baum"), ("mother", "Mutter"), ("father", "Vater"),
         ("cheese", "Käse"), ("dog", "Hund"), ("book", "Buch"), ("school", "Schule"), ("car", "Auto"),
         ("city", "Stadt"), ("night", "Nacht")]
german = [g for _, g in pairs]
frame = pd.DataFrame({"inputs": [e for e, _ in pairs],
                      "choices": [[german[(i + j) % len(german)] for j in (0, 3, 6, 9)] for i in range(len(pairs))],
                      "label": 0})
words = from_frame(frame, name="en-de-words", kind="mul")
translate = load_template("en-de-translation")
bare = dataclasses.replace(translate, name="en-de-bare", instruction="")
by_template = evaluate(cluster, words, templates=[translate, bare], shots=[0, 2], cache=cache)
print(by_template.rows["prompt"].iloc[-1])
by_template.summary[["template", "k", "n", "chance", "accuracy", "accuracy_low", "accuracy_high"]]"""),
    code("""\
by_template.templates"""),
    md("""\
## The evaluation tool

The same evaluation as a widget: pick a task, templates and k, press **Run** (it runs in the background, so
the notebook stays usable; **Stop** ends it and keeps what is finished). The summary shows the accuracy per
template and k with its interval; the failures are listed below it: choose one to see its prompt and the
scores of its choices, and **Open in Playground** to try the prompt yourself. It shares this notebook's cache,
so the run below is served from it."""),
    code("""\
from glmkit.widgets.evaluate import EvalWidget

tool = EvalWidget(cluster, "stdlib-mc", shots=[0, 1], limit=40, cache=cache)
tool"""),
    code("""\
tool.run()
tool.wait(300)
print(f"{len(tool.result.rows)} examples, {tool.result.cached} of them from the cache")
tool.failures[["example", "prediction", "gold"]].head(3)"""),
    md("""\
## The same task under lm-evaluation-harness

`GLMKitLM` is lm-eval's model interface (`loglikelihood`, `loglikelihood_rolling`, `generate_until`) over a
glmkit backend, this cluster here. `configs/tasks/lm-eval/` holds the shipped tasks as lm-eval YAMLs over
the same jsonl files; their paths are relative to the repository root, so lm-eval runs from there, offline.
On the same examples (the first 40 of each group), lm-eval's accuracy and each example's choice are the ones
glmkit's evaluator gave at k = 0."""),
    code("""\
import contextlib
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local data files only: never ask the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import lm_eval
from lm_eval.tasks import TaskManager

from glmkit.config import REPO_ROOT
from glmkit.evaluation.lm_eval_model import GLMKitLM

lm = GLMKitLM(cluster, progress=False)
manager = TaskManager(include_path=str(REPO_ROOT / "configs" / "tasks" / "lm-eval"), include_defaults=False)
docs = list(range(40)) + list(range(150, 190))  # the first 40 of import_module.jsonl and of first_param.jsonl
with contextlib.chdir(REPO_ROOT):
    harness = lm_eval.simple_evaluate(model=lm, tasks=["glmkit_stdlib_mc"], task_manager=manager,
                                      samples={"glmkit_stdlib_mc": docs}, log_samples=True, bootstrap_iters=0)
print({k: v for k, v in harness["results"]["glmkit_stdlib_mc"].items() if k.startswith("acc")})"""),
    code("""\
ours = rows[rows["k"] == 0].set_index("example")
same = 0
for sample in harness["samples"]["glmkit_stdlib_mc"]:
    scores = [r[0] for r in sample["filtered_resps"]]
    row = ours.loc[sample["doc"]["id"]]
    same += row["choices"][scores.index(max(scores))] == row["prediction"]
print(f"lm-eval and glmkit.evaluation: the same choice on {same} of {len(ours)} examples; "
      f"accuracy {harness['results']['glmkit_stdlib_mc']['acc,none']:.3f} and {ours['correct'].mean():.3f}")"""),
    md("""\
`GLMKitLM(pretrained="glm-tiny")` loads a pipeline itself, and importing `glmkit.evaluation.lm_eval_model`
registers it as lm-eval's model `"glmkit"`: `lm_eval.simple_evaluate(model="glmkit",
model_args="pretrained=glm-tiny", ...)`. A context holding a GLM mask has its blank scored (as above); a
plain context is continued, lm-eval's own reading; `loglikelihood_rolling` (perplexity) reads a text
left to right after `[gMASK]`, in windows of the model's length.

## When you are done

**Run All** leaves the evaluation tool on screen and the engines running, so you can go on using it. The next
cell closes both, but only once you set `DONE = True` in it and run it. Do that before you shut the kernel
down: a kernel's exit asks ipyparallel to stop its engines, but on a busy machine it may be killed first and
leave engine processes behind."""),
    teardown("""\
DONE = False  # set to True and run this cell to close the evaluation tool and stop the engines
if DONE:
    tool.close()
    cluster.close()"""),
]
