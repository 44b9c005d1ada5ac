"""`evaluate(backend, task, ...)`: every prompt checked first, then scored or generated in batches with a
progress bar, served from the cache where it can be, interruptible without losing what is finished."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd
from tqdm.auto import tqdm

from ..generate.blanks import MASK_PATTERN
from ..generate.sampling import GenerationSettings
from .cache import EvalCache, model_identity, unit_key
from .metrics import argmax, choice_scores, exact, exact_match, token_f1
from .prompts import Unit, answer_of, build_units, check_shots, resolve_templates
from .summary import over_templates, summarize
from .tasks import Task, TaskError, load_task

GENERATION_DEFAULTS = {"max_new_tokens": 32}  # a "gen" task's own settings (its YAML) override these


class EvaluationError(RuntimeError):
    """The backend failed on an example; `result` holds every example finished before it (incomplete)."""

    def __init__(self, message: str, result: "EvalResult"):
        super().__init__(message)
        self.result = result


@dataclass
class EvalResult:
    """Per-example `rows`, the `summary` per group/template/k, GLM-130B's max/median over `templates`, and
    whether every example was evaluated (`complete`; else `stopped` says why)."""

    rows: pd.DataFrame
    summary: pd.DataFrame
    templates: pd.DataFrame
    task: Task
    complete: bool = True
    stopped: str | None = None
    cached: int = 0  # examples served from the cache
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"INCOMPLETE ({self.stopped})"
        return (f"EvalResult({self.task.name!r}: {len(self.rows)} rows, {state}, {self.cached} from cache)\n"
                f"{self.summary.to_string(index=False)}")

    def _repr_html_(self) -> str:
        state = "" if self.complete else f" <b>incomplete: {self.stopped}</b>"
        return f"<p>{self.task.name}: {len(self.rows)} rows{state}</p>" + self.summary.to_html(index=False)


# ----- checks before any compute ----------------------------------------------------------------------

def _max_length(backend, task: Task) -> int | None:
    lengths = [task.max_seq_length]
    model = getattr(backend, "model", None)
    lengths.append(getattr(getattr(model, "config", None), "max_sequence_length", None))
    config = getattr(backend, "config", None)
    lengths.append(getattr(getattr(config, "model", None), "max_sequence_length", None))
    lengths = [n for n in lengths if isinstance(n, int)]
    return min(lengths) if lengths else None


def _where(task: Task, unit: Unit) -> str:
    return f"{task.rows['where'].iloc[unit.position]} (template {unit.template!r}, {unit.k} shots)"


def check_lengths(backend, task: Task, units: list[Unit], append_eos: bool = False) -> None:
    """TaskError naming the first example whose prompt (with its longest choice) overruns the model, counted
    as score() and generate() count (the mask, eos and sop GLM adds)."""
    tokenizer, limit = getattr(backend, "tokenizer", None), _max_length(backend, task)
    if tokenizer is None or limit is None:
        return
    choice_tokens: dict[str, int] = {}
    for unit in units:
        try:
            n = len(tokenizer.encode_with_masks(unit.prompt))
        except ValueError as error:
            raise TaskError(f"{_where(task, unit)}: {error}") from None
        blank = MASK_PATTERN.search(unit.prompt)
        n += 0 if blank else 1  # the mask GLM appends
        if task.kind == "mul":
            n += 1 if append_eos and blank and not unit.prompt.endswith(blank.group()) else 0
            choices = task.rows["choices"].iloc[unit.position]
            for c in choices:
                if c not in choice_tokens:
                    choice_tokens[c] = len(tokenizer.encode(c))
            n += max(choice_tokens[c] for c in choices)  # sop, then the choice less its last token
            what = "with its longest choice"
        else:
            n += (1 if blank and not unit.prompt.endswith(blank.group()) else 0) + 1  # eos, sop
            what = "before any generated token"
        if n > limit:
            raise TaskError(f"{_where(task, unit)}: field 'inputs' makes a prompt of {n} tokens {what}; the model "
                            f"takes at most {limit}: use fewer shots, a shorter template or a shorter context")


def _settings(task: Task, generation: dict | None) -> dict:
    settings = {**GENERATION_DEFAULTS, **task.generation, **(generation or {})}
    if "stop" in settings:
        raise TaskError("generation: give stop strings as the task's `stop` (or a template's), not in generation=")
    for name in ("should_abort", "on_text"):
        if name in settings:
            raise TaskError(f"generation: {name} is not a generation setting; pass should_abort= to evaluate")
    try:
        GenerationSettings.from_kwargs(**settings)
    except (TypeError, ValueError) as error:
        raise TaskError(f"generation settings: {error}") from None
    return settings


def _score_options(options: dict | None) -> dict:
    options = dict(options or {})
    unknown = sorted(set(options) - {"append_eos", "include_end", "batch_tokens"})
    if unknown:
        raise TaskError(f"score_options: unknown {unknown}; known: append_eos, include_end, batch_tokens "
                        f"(unidirectional and use_task_mask are the task's own)")
    return options


def _check_call(backend, task, by, batch_size, seed, progress, should_abort) -> None:
    method = "score" if task.kind == "mul" else "generate"
    if not callable(getattr(backend, method, None)):
        raise TypeError(f"backend {type(backend).__name__} has no {method}() method: pass a GLMPipeline or a "
                        f"GLMCluster")
    if task.kind == "gen" and task.unidirectional:
        raise TaskError(f"task {task.name!r}: unidirectional generation is not supported by generate(); "
                        f"evaluate it with unidirectional: false")
    missing = [b for b in by if b not in task.rows.columns]
    if missing:
        raise TaskError(f"by: the task has no columns {missing}; it has {list(task.rows.columns)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not isinstance(progress, bool):
        raise ValueError(f"progress must be True or False, got {progress!r}")
    if should_abort is not None and not callable(should_abort):
        raise TypeError(f"should_abort must be a function (or None), got {type(should_abort).__name__}")


# ----- model calls ------------------------------------------------------------------------------------

def _call(task: Task, unit: Unit, settings: dict) -> dict:
    """What decides the model's output for `unit` (the cache key's contents); `settings` are the generation
    settings, or the score options."""
    if task.kind == "mul":
        return {"call": "score", "prompt": unit.prompt, "choices": list(task.rows["choices"].iloc[unit.position]),
                "unidirectional": task.unidirectional, "use_task_mask": unit.use_task_mask,
                "options": {k: v for k, v in settings.items() if k != "batch_tokens"}}  # speed only
    return {"call": "generate", "prompt": unit.prompt, "settings": settings, "stops": list(unit.stops),
            "answer_stops": list(unit.answer_stops)}


def _score(backend, task: Task, units: list[Unit], options: dict) -> list[dict]:
    contexts = [u.prompt for u in units]
    choices = [list(task.rows["choices"].iloc[u.position]) for u in units]
    out = backend.score(contexts, choices, unidirectional=task.unidirectional, use_task_mask=units[0].use_task_mask,
                        **options)
    if not isinstance(out, list) or len(out) != len(units) or any(
            not isinstance(o, list) or len(o) != len(c) for o, c in zip(out, choices)):
        raise RuntimeError(f"backend.score returned {type(out).__name__} of the wrong shape: one list of scores "
                           f"per context, one score per choice")
    return [{"logprobs": [float(s.logprob) for s in scores], "num_tokens": [len(s.tokens) for s in scores],
             "greedy": [bool(s.greedy) for s in scores]} for scores in out]


def _answer_cut(completion: str, stops: tuple[str, ...]) -> str:
    """The completion up to the first whitespace-only stop after its answer began (FewShotTemplate's rule)."""
    lead = len(completion) - len(completion.lstrip())
    found = [i for i in (completion.find(s, lead) for s in stops) if i >= 0]
    return completion[:min(found)] if found and completion[lead:] else completion


def _generate(backend, task: Task, units: list[Unit], settings: dict, should_abort) -> list[dict | None]:
    results = backend.generate([u.prompt for u in units], stop=list(units[0].stops), should_abort=should_abort,
                               **settings)
    if not isinstance(results, list) or len(results) != len(units):
        raise RuntimeError(f"backend.generate returned {type(results).__name__}, not one result per prompt")
    out = []
    for unit, result in zip(units, results):
        if result.finish_reason == "abort":
            out.append(None)  # cut short: not an answer, neither kept nor cached
            continue
        out.append({"completion": _answer_cut(result.completion, unit.answer_stops),
                    "finish_reason": result.finish_reason, "num_tokens": result.num_generated_tokens})
    return out


def _batches(pending: list[int], units: list[Unit], size: int):
    """Runs of at most `size` pending units that one call can take (same stops and mask option)."""
    batch: list[int] = []
    for i in pending:
        if batch and (len(batch) == size or (units[i].stops, units[i].answer_stops, units[i].use_task_mask)
                      != (units[batch[0]].stops, units[batch[0]].answer_stops, units[batch[0]].use_task_mask)):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


# ----- rows -------------------------------------------------------------------------------------------

def _row(task: Task, unit: Unit, value: dict, cached: bool, by) -> dict:
    row = task.rows.iloc[unit.position]
    record = {"group": row["group"], "template": unit.template, "k": unit.k, "example": row["example"],
              **{b: row[b] for b in by}, "prompt": unit.prompt}
    if task.kind == "mul":
        choices = list(row["choices"])
        scores = choice_scores(value["logprobs"], value["num_tokens"], choices)
        picks = {name: argmax(values) for name, values in scores.items()}
        record |= {"choices": choices, "logprobs": scores["raw"], "logprobs_per_token": scores["token_norm"],
                   "logprobs_per_char": scores["char_norm"], "greedy": value["greedy"],
                   "prediction": choices[picks["raw"]], "gold": answer_of(row), "label": int(row["label"]),
                   "correct": picks["raw"] == row["label"],
                   "correct_token_norm": picks["token_norm"] == row["label"],
                   "correct_char_norm": picks["char_norm"] == row["label"]}
    else:
        targets = list(row["targets"])
        answer = value["completion"].strip()
        record |= {"completion": value["completion"], "prediction": answer, "gold": targets[0],
                   "targets": targets, "finish_reason": value["finish_reason"],
                   "exact_match": exact_match(answer, targets), "exact": exact(answer, targets),
                   "f1": token_f1(answer, targets)}
    record |= {"tokens": sum(value["num_tokens"]) if task.kind == "mul" else value["num_tokens"],
               "seconds": value["seconds"], "shots": list(unit.shots), "cached": cached}
    return record


def _result(task, units, finished, by, complete, stopped, cached, notes) -> EvalResult:
    rows = pd.DataFrame([_row(task, units[i], value, hit, by) for i, (value, hit) in sorted(finished.items())])
    summary = summarize(rows, task.kind, by)
    result = EvalResult(rows, summary, over_templates(summary, task.kind, by), task, complete, stopped, cached, notes)
    rows.attrs["complete"] = complete
    return result


def evaluate(backend, task, *, templates=None, shots=0, seed: int = 0, batch_size: int = 8,
             cache: EvalCache | str | None = None, model_id: str | None = None, progress: bool = True,
             should_abort: Callable[[], bool] | None = None, by: list[str] | tuple[str, ...] = (),
             template_examples: bool = False, generation: dict | None = None, score_options: dict | None = None,
             limit: int | None = None) -> EvalResult:
    """Evaluate `task` (a Task or what load_task reads) on `backend` for every template and k in `shots`;
    see glmkit.evaluation for the options."""
    task = load_task(task)
    by = [by] if isinstance(by, str) else list(by)
    _check_call(backend, task, by, batch_size, seed, progress, should_abort)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an integer >= 1 (examples per group), got {limit!r}")
        train = task.rows["split"].eq("train")
        keep = train | (task.rows[~train].groupby("group").cumcount() < limit).reindex(task.rows.index, fill_value=False)
        task = dataclasses.replace(task, rows=task.rows[keep].reset_index(drop=True))
    settings = _settings(task, generation) if task.kind == "gen" else _score_options(score_options)
    units = build_units(task, resolve_templates(templates), check_shots(shots), seed, template_examples)
    check_lengths(backend, task, units, bool((score_options or {}).get("append_eos", False)))

    identity = model_identity(backend, model_id)
    notes = [] if identity is not None else ["no cache: the backend has no config; pass model_id= to cache"]
    if cache is None or cache is False:
        cache = EvalCache()
    elif not isinstance(cache, EvalCache):
        cache = EvalCache(cache)
    keys = [unit_key(identity, _call(task, u, settings)) if identity else None for u in units]
    finished: dict[int, tuple[dict, bool]] = {}
    for i, key in enumerate(keys):
        value = cache.get(key) if key else None
        if value is not None:
            finished[i] = (value, True)
    cached = len(finished)
    pending = [i for i in range(len(units)) if i not in finished]
    stopped = None
    bar = tqdm(total=len(units), initial=cached, disable=not progress, desc=f"{task.name}", unit="ex")
    try:
        for batch in _batches(pending, units, batch_size):
            if should_abort is not None and should_abort():
                stopped = "aborted"
                break
            started = time.perf_counter()
            try:
                outputs = _score(backend, task, [units[i] for i in batch], settings) if task.kind == "mul" else \
                    _generate(backend, task, [units[i] for i in batch], settings, should_abort)
            except Exception as error:  # KeyboardInterrupt is no Exception: it ends the loop below
                partial = _result(task, units, finished, by, False, f"error: {error}", cached, notes)
                raise EvaluationError(f"task {task.name!r}: the backend failed on {_where(task, units[batch[0]])}"
                                      f"{f' (or another of its batch of {len(batch)})' if len(batch) > 1 else ''}: "
                                      f"{type(error).__name__}: {error}; the {len(finished)} finished examples are "
                                      f"in this error's .result", partial) from error
            seconds = (time.perf_counter() - started) / len(batch)
            for i, value in zip(batch, outputs):
                if value is None:
                    continue
                value["seconds"] = round(seconds, 4)
                if keys[i]:
                    cache.put(keys[i], value)
                finished[i] = (value, False)
            bar.update(sum(v is not None for v in outputs))
            if any(v is None for v in outputs):
                stopped = "aborted"
                break
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        bar.close()
    return _result(task, units, finished, by, len(finished) == len(units), stopped, cached, notes)
