"""The prompts of an evaluation: k demonstrations drawn with a seed, laid out by a few-shot template
(glmkit.widgets.templates.FewShotTemplate) or in the task's own format.

Shots: for each example, the pool is the task's "train" rows when it has any, else the other examples of
its group and prompt file (never the example itself). One seeded shuffle per example (seed, group and the
example's id) is drawn for the largest k and each k takes its first k, so the 1 shot is among the 4.

Own format (GLM-130B's: the context is the prompt): the demonstrations are other examples with their answer
written in, i.e. the blank replaced by it (or the answer after the context, a space between, when the
context has no blank), joined by a blank line before the example's context.
A template: its examples are replaced by the k drawn ones (input = the example's context, output = its
answer; `template_examples=True` keeps the template's own examples before them) and the example's context
is the query; contexts holding a mask do not fit a template and are refused, naming the row. A template
without a `mask` is scored and generated as a [gMASK] continuation, as the FewShot tool generates it.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

from ..generate.blanks import MASK_PATTERN
from ..widgets.templates import Example, FewShotTemplate, TemplateError, load_template
from .tasks import Task, TaskError

SHOT_SEPARATOR = "\n\n"
OWN_FORMAT = "task"  # the template name of the task's own format


@dataclass(frozen=True)
class Unit:
    """One prompt to score (choices) or to generate from: a task row under a template with k shots."""

    template: str
    k: int
    position: int  # the row's place in task.rows
    prompt: str
    shots: tuple[str, ...]  # the demonstrations' example ids
    stops: tuple[str, ...]  # generation: stop strings passed to generate()
    answer_stops: tuple[str, ...]  # generation: whitespace-only stops, applied once the answer has begun
    use_task_mask: bool  # a context without a mask gets [gMASK] (else [MASK]) where the answer goes


def resolve_templates(templates) -> list[tuple[str, FewShotTemplate | None]]:
    """(name, template) pairs: None / "task" is the task's own format; names and paths load YAML files."""
    if templates is None or isinstance(templates, (str, Path, FewShotTemplate)):
        templates = [templates]
    if not isinstance(templates, (list, tuple)) or not templates:
        raise TaskError(f"templates must be a template, a name, a path or a non-empty list of them, got {templates!r}")
    out = []
    for i, item in enumerate(templates):
        if item is None or item == OWN_FORMAT:
            out.append((OWN_FORMAT, None))
            continue
        try:
            template = item if isinstance(item, FewShotTemplate) else load_template(item)
        except (TemplateError, FileNotFoundError, TypeError) as error:
            raise TaskError(f"templates[{i}]: {error}") from None
        out.append((template.name, template))
    names = [n for n, _ in out]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TaskError(f"templates: the names {repeated} repeat; give each template its own name")
    return out


def check_shots(shots) -> list[int]:
    """The k values: an int or a list of distinct ints >= 0."""
    values = [shots] if isinstance(shots, int) and not isinstance(shots, bool) else shots
    if not isinstance(values, (list, tuple)) or not values or not all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in values):
        raise TaskError(f"shots must be an integer >= 0 or a list of them (e.g. [0, 1, 4]), got {shots!r}")
    if len(set(values)) != len(values):
        raise TaskError(f"shots {list(values)} repeats a value")
    return list(values)


def answer_of(row) -> str:
    """The right answer's text: the labelled choice, or the first target."""
    return row["choices"][row["label"]] if row["choices"] is not None else row["targets"][0]


def filled(context: str, answer: str) -> str:
    """The context with its blank replaced by the answer; without a blank, the answer after it."""
    found = MASK_PATTERN.search(context)
    if found:
        return context[:found.start()] + answer + context[found.end():]
    space = "" if not context or context[-1].isspace() or answer[:1].isspace() else " "
    return context + space + answer


def shot_pools(task: Task) -> dict[tuple[str, str], list[int]]:
    """Row positions each (group, prompt_name) draws its demonstrations from (before excluding an example)."""
    rows = task.rows
    train = [i for i, s in enumerate(rows["split"]) if s == "train"]
    pools: dict[tuple[str, str], list[int]] = {}
    for i, (group, prompt, split) in enumerate(zip(rows["group"], rows["prompt_name"], rows["split"])):
        if split != "train":
            pools.setdefault((group, prompt), [])
            if not train:
                pools[(group, prompt)].append(i)
    return {key: (train if train else members) for key, members in pools.items()}


def draw_shots(task: Task, position: int, k_max: int, seed: int, pools=None) -> list[int]:
    """The row positions of up to `k_max` demonstrations for the example at `position`, in order."""
    if k_max == 0:
        return []
    row = task.rows.iloc[position]
    pools = pools if pools is not None else shot_pools(task)
    pool = [i for i in pools[(row["group"], row["prompt_name"])] if i != position]
    if len(pool) < k_max:
        raise TaskError(f"{row['where']}: {k_max} shots asked for, but its pool (group {row['group']!r}) holds only "
                        f"{len(pool)} other examples; ask for fewer shots or give 'train' rows")
    rng = random.Random(f"glmkit-shots:{seed}:{row['group']}:{row['prompt_name']}:{row['example']}")
    return rng.sample(pool, k_max)


def _split_stops(stops) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(s for s in stops if s.strip()), tuple(s for s in stops if not s.strip())


def build_units(task: Task, templates, shots: list[int], seed: int, template_examples: bool = False) -> list[Unit]:
    """Every prompt of the evaluation, template by template, k by k, row by row; TaskError names the first
    row or field that does not fit (before anything is computed)."""
    pools = shot_pools(task)
    rows = task.rows
    evaluated = [i for i, s in enumerate(rows["split"]) if s != "train"]
    drawn = {i: draw_shots(task, i, max(shots), seed, pools) for i in evaluated}
    # Each prompt file of a group is a prompt of its own (GLM-130B): it is the template of its rows.
    files = {g: len(set(rows["prompt_name"][rows["group"] == g])) for g in set(rows["group"])}
    units = []
    for name, template in templates:
        for k in shots:
            for i in evaluated:
                row = rows.iloc[i]
                demos = [rows.iloc[j] for j in drawn[i][:k]]
                ids = tuple(d["example"] for d in demos)
                if template is None:
                    prompt = SHOT_SEPARATOR.join([filled(d["inputs"], answer_of(d)) for d in demos] + [row["inputs"]])
                    if task.kind == "gen" and not MASK_PATTERN.search(prompt) and not task.use_task_mask:
                        prompt += "[MASK]"  # GLM-130B: a generation without a blank fills a [MASK] at the end
                    label = name if files[row["group"]] == 1 else f"{name}:{row['prompt_name']}"
                    units.append(Unit(label, k, i, prompt, ids, task.stop, (), task.use_task_mask))
                    continue
                prompt, stops = _template_prompt(task, template, name, row, demos, template_examples)
                visible, answer = _split_stops(stops)
                # A template without a mask means a [gMASK] continuation (as the FewShot tool generates it).
                units.append(Unit(name, k, i, prompt, ids, visible, answer, task.use_task_mask or template.mask is None))
    return units


def _template_prompt(task: Task, template: FewShotTemplate, name: str, row, demos, keep: bool):
    for d in [row] + demos:
        if MASK_PATTERN.search(d["inputs"]):
            raise TaskError(f"{d['where']}: field 'inputs' holds a mask, which does not fit template {name!r} "
                            f"(its layout places the answer); evaluate it in the task's own format "
                            f"(templates=None)")
    examples = (list(template.examples) if keep else []) + [Example(d["inputs"], answer_of(d)) for d in demos]
    try:
        shaped = dataclasses.replace(template, examples=examples)
        prompt = shaped.build_prompt(row["inputs"])
    except TemplateError as error:
        raise TaskError(f"{row['where']}: template {name!r} does not fit: {error}") from None
    stops = shaped.stop_sequences() + [s for s in task.stop if s not in shaped.stop_sequences()]
    return prompt, tuple(stops)
