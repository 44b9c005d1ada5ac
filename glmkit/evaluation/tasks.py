"""Evaluation tasks: a table of examples checked row by row, read from a DataFrame, CSV or jsonl file (GLM-130B
task YAMLs: glmkit.evaluation.glm130b), with errors that name the row and the field.

Columns (GLM-130B's jsonl names first; the short ones are accepted too):
  inputs_pretokenized | inputs | input    the context text; a [MASK] in it is the blank the answer fills
  choices_pretokenized | choices          multiple choice: the answers to score (a list; in CSV a JSON list)
  label                                   multiple choice: the index of the right choice
  targets_pretokenized | targets | target generation: the accepted answers (a string or a list of them)
  split                                   optional: rows whose split is "train" are the k-shot pool only
  id                                      optional: the example's name in results (default: where it is)
Other columns are kept, so results can be grouped by them (`evaluate(..., by=["kind"])`).
GLM-130B's `inputs`/`choices`/`targets` fields without `_pretokenized` hold token ids; glmkit needs text.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..config import CONFIG_DIR
from ..generate.blanks import check_masks

TASK_DIR = CONFIG_DIR / "tasks"
KINDS = {"mul": "multiple choice", "gen": "generation"}
ALIASES = {"inputs": ("inputs_pretokenized", "inputs", "input"),
           "choices": ("choices_pretokenized", "choices"),
           "label": ("label",),
           "targets": ("targets_pretokenized", "targets", "target")}
META = ("example", "group", "prompt_name", "split", "where")  # what glmkit adds to every row
MASKS = ("[MASK]", "[sMASK]", "[gMASK]")


class TaskError(ValueError):
    """A task file, a row or a field is malformed; the message names it and says what to change."""


@dataclass(frozen=True, eq=False)
class Task:
    """Checked examples (`rows`: one per example, glmkit's columns first) and how to evaluate them.

    `kind` is "mul" (multiple choice by log-likelihood) or "gen" (generation, exact match and F1);
    `use_task_mask` appends [gMASK] instead of [MASK] to a context without one and `unidirectional` scores
    with causal attention over the context (GLM-130B's options); `generation` holds the generate() settings
    of a "gen" task (max_new_tokens, num_beams ...) and `stop` its stop strings.
    """

    name: str
    kind: str
    rows: pd.DataFrame
    use_task_mask: bool = False
    unidirectional: bool = False
    generation: dict = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    source: str = ""
    notes: tuple[str, ...] = ()
    max_seq_length: int | None = None  # the task's own bound (GLM-130B's max_seq_length), besides the model's

    def __post_init__(self):
        for flag in ("use_task_mask", "unidirectional"):
            if not isinstance(getattr(self, flag), bool):
                raise TaskError(f"task {self.name!r}: {flag} must be true or false, got {getattr(self, flag)!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise TaskError(f"task {self.name!r}: stop must be a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        if not isinstance(self.generation, dict):
            raise TaskError(f"task {self.name!r}: generation must be a mapping of generate() settings, "
                            f"got {self.generation!r}")
        if self.kind not in KINDS:
            raise TaskError(f"task {self.name!r}: kind must be one of {sorted(KINDS)}, got {self.kind!r}")
        if self.unidirectional and not self.use_task_mask:
            raise TaskError(f"task {self.name!r}: unidirectional needs use_task_mask (GLM-130B: a [MASK] blank "
                            f"cannot be scored with unidirectional attention)")
        if not len(self.eval_rows):
            raise TaskError(f"task {self.name!r} has no examples to evaluate (only split 'train' rows, or none)")

    @property
    def eval_rows(self) -> pd.DataFrame:
        return self.rows[self.rows["split"] != "train"]

    @property
    def train_rows(self) -> pd.DataFrame:
        return self.rows[self.rows["split"] == "train"]

    def __repr__(self) -> str:
        return (f"Task({self.name!r}, {KINDS[self.kind]}, {len(self.eval_rows)} examples"
                f"{f', {len(self.train_rows)} train' if len(self.train_rows) else ''})")


# ----- rows ---------------------------------------------------------------------------------------------

def _missing(value) -> bool:
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def _text(value, where: str, name: str, allow_empty: bool = True) -> str:
    if _missing(value):
        raise TaskError(f"{where}: field {name!r} is missing (empty); give the text")
    if not isinstance(value, str):
        hint = " (token ids: glmkit reads the *_pretokenized text fields)" if isinstance(value, list) else ""
        raise TaskError(f"{where}: field {name!r} must be a string, got {type(value).__name__} {value!r:.60}{hint}")
    if not allow_empty and not value.strip():
        raise TaskError(f"{where}: field {name!r} is empty; an answer needs text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise TaskError(f"{where}: field {name!r} holds a lone surrogate at character {error.start}, "
                        f"which is not valid Unicode") from None
    return value


def _no_masks(text: str, where: str, name: str) -> None:
    try:
        kinds = check_masks(text)
    except ValueError as error:
        raise TaskError(f"{where}: field {name!r}: {error}") from None
    if kinds:
        raise TaskError(f"{where}: field {name!r} holds {kinds[0]}, which GLM would read as a blank; reword it")


def _text_list(value, where: str, name: str) -> tuple[str, ...]:
    if isinstance(value, str) and value.lstrip().startswith("["):  # CSV cells hold lists as JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise TaskError(f"{where}: field {name!r} is not a JSON list: {error}") from None
    if isinstance(value, tuple):
        value = list(value)
    if hasattr(value, "tolist") and not isinstance(value, str):  # numpy arrays from parquet or pandas
        value = value.tolist()
    if not isinstance(value, list):
        raise TaskError(f"{where}: field {name!r} must be a list of strings, got {type(value).__name__} "
                        f"{value!r:.60}")
    if not value:
        raise TaskError(f"{where}: field {name!r} is an empty list; give at least one")
    items = tuple(_text(v, where, f"{name}[{i}]", allow_empty=False) for i, v in enumerate(value))
    for i, item in enumerate(items):
        _no_masks(item, where, f"{name}[{i}]")
    return items


def _label(value, where: str, num_choices: int) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if _missing(value):
        raise TaskError(f"{where}: field 'label' is missing; give the index of the right choice")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TaskError(f"{where}: field 'label' must be an integer index into the choices, got {value!r:.60}")
    if not 0 <= value < num_choices:
        raise TaskError(f"{where}: field 'label' is {value}, out of range for {num_choices} choices "
                        f"(0..{num_choices - 1})")
    return value


def check_row(raw: dict, kind: str, where: str) -> dict:
    """glmkit's fields of one raw example (`inputs`, `choices`/`label` or `targets`), each checked."""
    inputs = _text(raw.get("inputs"), where, raw.get("_inputs_name", "inputs"))
    try:
        masks = check_masks(inputs)
    except ValueError as error:
        raise TaskError(f"{where}: field {raw.get('_inputs_name', 'inputs')!r}: {error}") from None
    if len(masks) > 1:
        raise TaskError(f"{where}: field {raw.get('_inputs_name', 'inputs')!r} holds {len(masks)} masks; "
                        f"an example has one blank for its answer")
    row = {"inputs": inputs, "choices": None, "label": None, "targets": None}
    if kind == "mul":
        row["choices"] = _text_list(raw.get("choices"), where, raw.get("_choices_name", "choices"))
        repeated = [c for i, c in enumerate(row["choices"]) if c in row["choices"][:i]]
        if repeated:
            raise TaskError(f"{where}: field {raw.get('_choices_name', 'choices')!r} repeats {repeated[0]!r}; "
                            f"choices must differ")
        row["label"] = _label(raw.get("label"), where, len(row["choices"]))
    else:
        targets = raw.get("targets")
        if isinstance(targets, str) and not targets.lstrip().startswith("["):
            targets = [targets]
        row["targets"] = _text_list(targets, where, raw.get("_targets_name", "targets"))
    return row


def _canonical(record: dict, columns: dict[str, str]) -> dict:
    raw = {key: record.get(name) for key, name in columns.items()}
    raw.update({f"_{key}_name": name for key, name in columns.items()})
    return raw


def _columns(names, kind: str | None, what: str) -> tuple[dict[str, str], str]:
    """Which source column holds each of glmkit's fields, and the task kind (inferred when not given)."""
    found = {}
    for key, aliases in ALIASES.items():
        present = [a for a in aliases if a in names]
        if len(present) > 1:
            raise TaskError(f"{what}: columns {present} both give {key!r}; keep one")
        if present:
            found[key] = present[0]
    if kind is None:
        kind = "mul" if "choices" in found else "gen" if "targets" in found else None
    if kind not in KINDS:
        raise TaskError(f"{what}: cannot tell the task kind: give a 'choices_pretokenized' column (multiple choice) "
                        f"or 'targets_pretokenized' (generation), or kind='mul'/'gen'" if kind is None else
                        f"{what}: kind must be 'mul' or 'gen', got {kind!r}")
    needed = ("inputs", "choices", "label") if kind == "mul" else ("inputs", "targets")
    for key in needed:
        if key not in found:
            raise TaskError(f"{what}: column {ALIASES[key][0]!r} (or {' / '.join(ALIASES[key][1:]) or 'no alias'}) "
                            f"is missing; a {KINDS[kind]} task needs {', '.join(needed)}; columns are {sorted(names)}")
    return found, kind


def build_rows(records: list[tuple[str, str, str, dict]], kind: str | None, what: str) -> tuple[pd.DataFrame, str]:
    """The checked rows of (where, group, prompt_name, record) tuples; raises TaskError at the first bad one."""
    names = set().union(*(r[3].keys() for r in records)) if records else set()
    columns, kind = _columns(names, kind, what)
    taken = set(columns.values()) | {"id", "split"}
    extra = sorted(n for n in names - taken if n not in META + ("inputs", "choices", "label", "targets"))
    out, seen = [], {}
    for where, group, prompt_name, record in records:
        if not isinstance(record, dict):
            raise TaskError(f"{where}: an example must be a JSON object of fields, got {type(record).__name__}")
        row = check_row(_canonical(record, columns), kind, where)
        split = record.get("split", "test")
        split = "test" if _missing(split) else split
        if split not in ("train", "test", "validation"):
            raise TaskError(f"{where}: field 'split' must be 'train', 'validation' or 'test', got {split!r:.40}")
        if not _missing(record.get("group")):  # a row's own group (a column of a DataFrame) wins
            group = str(record["group"])
        example = record.get("id")
        example = where if _missing(example) else str(example)
        if (group, prompt_name, example) in seen:
            raise TaskError(f"{where}: id {example!r} repeats {seen[(group, prompt_name, example)]}; ids must differ")
        seen[(group, prompt_name, example)] = where
        out.append({"example": example, "group": group, "prompt_name": prompt_name, "split": split,
                    "where": where, **row, **{n: record.get(n) for n in extra}})
    frame = pd.DataFrame(out, columns=list(META) + ["inputs", "choices", "label", "targets"] + extra)
    return frame, kind


# ----- sources ------------------------------------------------------------------------------------------

def read_jsonl(path: Path, label: str | None = None) -> list[tuple[str, dict]]:
    """(where, record) per non-blank line of a jsonl file (a .json file holding one list works too);
    `where` is "<label> line N" (label: the file's name by default)."""
    label = label or path.name
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise TaskError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return [(f"{label} item {i}", r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as error:
            raise TaskError(f"{path}: not valid JSON: {error}") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"{label} line {number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise TaskError(f"{label} line {number}: not valid JSON: {error.msg} at column {error.colno}") from None
    return records


def from_frame(frame: pd.DataFrame, *, name: str = "task", kind: str | None = None, what: str | None = None,
               where: str = "row", **options) -> Task:
    """A task from a DataFrame (one example per row; columns as the module docstring lists them)."""
    if not isinstance(frame, pd.DataFrame):
        raise TaskError(f"expected a pandas DataFrame, got {type(frame).__name__}")
    records = [(f"{where} {index}", name, name, {k: v for k, v in record.items()})
               for index, record in zip(frame.index, frame.to_dict("records"))]
    rows, kind = build_rows(records, kind, what or f"task {name!r}")
    return Task(name, kind, rows, source="DataFrame", **options)


def from_records(records: list[dict], *, name: str = "task", kind: str | None = None, **options) -> Task:
    """A task from a list of example dicts (fields as the module docstring lists them)."""
    rows, kind = build_rows([(f"row {i}", name, name, r) for i, r in enumerate(records)], kind, f"task {name!r}")
    return Task(name, kind, rows, source="records", **options)


def from_csv(path: Path, *, name: str | None = None, kind: str | None = None, **options) -> Task:
    """A task from a CSV file (choices / targets as JSON lists in their cells)."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.index = frame.index + 2  # the file's line numbers (line 1 is the header)
    task = from_frame(frame, name=name or path.stem, kind=kind, what=str(path), where=f"{path.name} line", **options)
    return _with_source(task, str(path))


def from_jsonl(path: Path, *, name: str | None = None, kind: str | None = None, **options) -> Task:
    """A task from one jsonl file of GLM-130B-style records."""
    name = name or path.stem
    records = [(where, name, name, record) for where, record in read_jsonl(path)]
    rows, kind = build_rows(records, kind, str(path))
    return Task(name, kind, rows, source=str(path), **options)


def _with_source(task: Task, source: str) -> Task:
    return dataclasses.replace(task, source=source)


def load_task(source, *, kind: str | None = None, name: str | None = None, **options) -> Task:
    """A Task from a DataFrame, a list of example dicts, a .csv / .jsonl / .json file, a GLM-130B task .yaml,
    or a shipped task's name ("stdlib-mc", "stdlib-completion"); a Task is returned as it is."""
    if isinstance(source, Task):
        return source
    allowed = {"use_task_mask", "unidirectional", "generation", "stop", "max_seq_length", "data_root"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"load_task: unknown options {unknown}; known: {sorted(allowed)}")
    data_root = options.pop("data_root", None)
    if data_root is not None and not isinstance(source, (str, Path)):
        raise TypeError("load_task: data_root is for GLM-130B task YAMLs (their DATA_PATH)")
    if isinstance(source, pd.DataFrame):
        return from_frame(source, name=name or "task", kind=kind, **options)
    if isinstance(source, (list, tuple)):
        return from_records(list(source), name=name or "task", kind=kind, **options)
    if not isinstance(source, (str, Path)):
        raise TaskError(f"load_task takes a DataFrame, a list of example dicts, a file path or a shipped task's "
                        f"name, got {type(source).__name__}")
    path = Path(source).expanduser()
    if not path.exists() and (TASK_DIR / str(source)).is_dir():
        path = TASK_DIR / str(source)
    if path.is_dir():
        found = sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml"))
        if len(found) != 1:
            raise TaskError(f"{path}: expected one task .yaml in the folder, found {[p.name for p in found]}")
        path = found[0]
    if not path.is_file():
        shipped = sorted(p.name for p in TASK_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml"))) \
            if TASK_DIR.is_dir() else []
        raise TaskError(f"no task file {str(source)!r} and no shipped task of that name; shipped: {shipped}")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        from .glm130b import from_glm130b_yaml
        return from_glm130b_yaml(path, kind=kind, name=name, data_root=data_root, **options)
    if data_root is not None:
        raise TypeError(f"load_task: data_root is for GLM-130B task YAMLs (their DATA_PATH), not {path.name}")
    if suffix == ".csv":
        return from_csv(path, name=name, kind=kind, **options)
    if suffix in (".jsonl", ".json"):
        return from_jsonl(path, name=name, kind=kind, **options)
    raise TaskError(f"{path}: unknown task file type {suffix!r}; use .csv, .jsonl, .json or a GLM-130B .yaml")
