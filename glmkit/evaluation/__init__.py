"""Evaluate a GLM on tasks: multiple choice by log-likelihood, generation by exact match and F1.

    from glmkit.evaluation import EvalCache, evaluate, load_task
    task = load_task("stdlib-mc")                   # shipped; or a GLM-130B task .yaml, .jsonl, .csv, DataFrame
    cache = EvalCache()                             # EvalCache("eval-cache/") keeps results on disk too
    result = evaluate(glm, task, shots=[0, 1, 4], seed=0, cache=cache)
    result.summary      # accuracy per group, template and k, with a 95 % Wilson interval
    result.templates    # max / median / average over templates (GLM-130B's report)
    result.rows         # one row per example: prompt, choice scores, prediction, gold, correct, tokens, seconds

`backend` is a GLMPipeline or a GLMCluster: multiple choice calls `backend.score(contexts, choices,
unidirectional=..., use_task_mask=...)`, generation `backend.generate(prompts, stop=..., should_abort=...,
**settings)`. GLM-130B's conventions: a [MASK] in a context is the blank the answer fills; a context without
one gets [MASK] appended (or [gMASK] with the task's `use_task_mask`).

evaluate(backend, task, *, templates=None, shots=0, seed=0, batch_size=8, cache=None, model_id=None,
         progress=True, should_abort=None, by=(), template_examples=False, generation=None, limit=None)
  templates   None (or "task"): the task's own format; else a FewShotTemplate, a template name from
              configs/templates, a YAML path, or a list of them (each one a row of the summary)
  shots       k demonstrations per prompt (an int or a list): drawn with `seed` from the task's "train"
              rows, else from the other examples of the same group (never the example itself)
  cache       an EvalCache (or a folder for one); results are keyed by the model's identity (its config
              and checkpoint files, or `model_id`), the exact prompt (rows, template, k and seed are in it),
              the choices or generation settings and the options, so a re-run is served without model calls
  should_abort  polled between batches (and inside generation); True, or a KeyboardInterrupt, stops the
              run and returns what is finished, with `result.complete` False
  by          task columns (e.g. ["kind", "source"]) to break the summary down by
  generation  generate() settings over the task's (max_new_tokens, num_beams ...)
  limit       evaluate only the first `limit` examples of each group
Every prompt is built and checked (fields, template fit, length against the model) before any compute;
bad data raises TaskError naming the row and field. A backend failure mid-run raises EvaluationError, whose
`.result` holds the examples finished before it (they are in the cache too).

Metrics. Multiple choice: a choice's log probability as `score` returns it (GLM-130B's criterion:
`accuracy`), per scored token (`accuracy_token_norm`) and per character of the choice's text
(`accuracy_char_norm`, as lm-evaluation-harness's acc_norm but counting characters, not bytes); `chance` is
the mean of 1 / number of choices. Generation: the answer is the completion stripped of surrounding
whitespace; `exact_match` and `f1` are GLM-130B's (SQuAD-normalised: lower case, no punctuation or
articles), `exact` is strict equality. Proportions carry a 95 % Wilson score interval (`_low`, `_high`).
"""
from .cache import EvalCache, model_identity
from .metrics import exact, exact_match, normalize_answer, token_f1, wilson_interval
from .runner import EvalResult, EvaluationError, evaluate
from .tasks import Task, TaskError, from_frame, load_task

__all__ = ["evaluate", "load_task", "from_frame", "EvalResult", "EvaluationError", "EvalCache", "Task",
           "TaskError", "model_identity", "exact", "exact_match", "normalize_answer", "token_f1",
           "wilson_interval"]
