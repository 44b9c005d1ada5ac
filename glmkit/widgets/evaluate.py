"""The evaluation tool: pick a task, templates and k, run glmkit's evaluate() in the background, read the
accuracy per template with its 95 % interval, and open any failure in a Playground."""
from __future__ import annotations

import re
import threading
from pathlib import Path

import ipywidgets as w
import pandas as pd
import yaml

from ..evaluation import EvalCache, EvalResult, EvaluationError, evaluate, load_task
from ..evaluation.prompts import OWN_FORMAT
from ..evaluation.tasks import TASK_DIR, Task
from ._base import Tool, backend_lock, info_html, labelled
from .playground import Playground
from .render import BOX, esc, visible_whitespace_html
from .templates import shipped_templates

FROM_PATH = "(a file: enter its path)"
# The headline proportion of each task kind, and what a failed example is.
HEADLINE = {"mul": "accuracy", "gen": "exact_match"}
FAILED = {"mul": "correct", "gen": "exact_match"}
PROMPT_CHARS = 48  # of a failure's prompt in the list


def shipped_tasks() -> list[str]:
    """Names of the shipped tasks in GLM-130B's format (configs/tasks/<name>/, a YAML with a `type`)."""
    names = []
    for folder in sorted(p for p in TASK_DIR.iterdir() if p.is_dir()) if TASK_DIR.is_dir() else []:
        files = sorted(folder.glob("*.yaml"))
        # configs/tasks/lm-eval holds lm-evaluation-harness YAMLs: those have no `type`, and are not read here.
        if len(files) == 1 and "type" in (yaml.safe_load(files[0].read_text()) or {}):
            names.append(folder.name)
    return names


def parse_shots(text: str) -> list[int]:
    """k values typed as "0, 1, 4" (or one number); ValueError names the field."""
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"k (shots) must be whole numbers >= 0 separated by commas, e.g. 0, 1, 4; got {text!r}")
    values = [int(p) for p in parts]
    if len(set(values)) != len(values):
        raise ValueError(f"k (shots) repeats a value: {text!r}")
    return values


def summary_html(summary: pd.DataFrame, kind: str) -> str:
    """The summary as a table: n, the headline proportion with its interval (and chance), per group,
    template and k."""
    metric = HEADLINE[kind]
    head = ["group", "template", "k", "n", metric, "95 % interval"] + (["chance"] if kind == "mul" else ["f1"])
    lines = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for _, row in summary.iterrows():
        cells = [row["group"], row["template"], row["k"], row["n"], f"{row[metric]:.3f}",
                 f"[{row[f'{metric}_low']:.3f}, {row[f'{metric}_high']:.3f}]",
                 f"{row['chance']:.3f}" if kind == "mul" else f"{row['f1']:.3f}"]
        lines.append("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in cells) + "</tr>")
    return "".join(lines) + "</table>"


def failure_html(row: pd.Series, kind: str) -> str:
    """One failed example: its prompt (whitespace visible), the choices' scores or the completion, the gold."""
    parts = [f"<b>{esc(str(row['example']))}</b> ({esc(str(row['group']))}, template {esc(str(row['template']))}, "
             f"k={row['k']})", f'<div style="{BOX};border:1px solid #ddd;padding:4px">'
             f"{visible_whitespace_html(row['prompt'])}</div>"]
    if kind == "mul":
        items = []
        for choice, logprob in zip(row["choices"], row["logprobs"]):
            mark = " ✔ gold" if choice == row["gold"] else (" ✘ picked" if choice == row["prediction"] else "")
            items.append(f"<li><code>{esc(choice)}</code>: {logprob:.3f}{mark}</li>")
        parts.append("log-probabilities:<ul>" + "".join(items) + "</ul>")
    else:
        parts.append(f"answer <code>{esc(row['prediction'])}</code> (finish reason {esc(row['finish_reason'])}); "
                     f"accepted: " + ", ".join(f"<code>{esc(t)}</code>" for t in row["targets"]))
    return "<br>".join(parts)


class _Counting:
    """The backend, telling the tool how many examples each score/generate call finished (its progress)."""

    def __init__(self, backend, on_done):
        self._backend, self._on_done = backend, on_done

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def score(self, contexts, continuations, **options):
        out = self._backend.score(contexts, continuations, **options)
        self._on_done(len(contexts) if isinstance(contexts, list) else 1)
        return out

    def generate(self, prompts, **kwargs):
        out = self._backend.generate(prompts, **kwargs)
        self._on_done(len(prompts) if isinstance(prompts, list) else 1)
        return out


class EvalWidget(Tool):
    """Evaluation over any backend with `.score()` and `.generate()` (a GLMPipeline or a GLMCluster).

    Pick a shipped task (or a file), one or more templates ("task" is the task's own format) and k (shots);
    Run evaluates in the background (Stop ends it after the current batch, keeping what is finished; results
    are cached, so a re-run is served from `cache`). `result` is the last EvalResult; the summary shows the
    headline metric per template and k with its 95 % Wilson interval; `failures` lists the examples it got
    wrong, and `open_in_playground()` (the button) puts the chosen one's prompt into a Playground.
    """

    def __init__(self, backend, task: str | Path | Task = "stdlib-mc", *, templates=None, shots=0, seed: int = 0,
                 limit: int | None = None, batch_size: int = 8, cache: EvalCache | str | None = None,
                 playground: Playground | None = None):
        super().__init__()
        self.backend = backend
        self.cache = cache if isinstance(cache, EvalCache) else EvalCache(cache)
        self.batch_size = batch_size
        self.playground = playground
        self._own_playground = playground is None  # one made here is closed with the tool
        self.result: EvalResult | None = None
        self._task_object = task if isinstance(task, Task) else None
        self._done = 0

        tasks = shipped_tasks() + ([f"{task.name} (given)"] if self._task_object else []) + [FROM_PATH]
        initial = tasks[-2] if self._task_object else (str(task) if str(task) in tasks else FROM_PATH)
        self.task_picker = labelled(w.Dropdown(options=tasks, value=initial, layout=w.Layout(width="24em")), "task",
                                    width="5em")
        self.task_path = w.Text("" if initial != FROM_PATH else str(task), placeholder="path/to/task.yaml or .jsonl",
                                layout=w.Layout(width="24em"))
        names = [OWN_FORMAT] + shipped_templates()
        chosen = [t for t in ([templates] if isinstance(templates, str) else templates or [OWN_FORMAT])]
        self.template_picker = labelled(w.SelectMultiple(options=names, value=[t for t in chosen if t in names],
                                                         rows=min(len(names), 4), layout=w.Layout(width="24em")),
                                        "templates", "'task' is the task's own format; ctrl/cmd-click for several",
                                        width="5em")
        self.shots = labelled(w.Text(", ".join(str(k) for k in ([shots] if isinstance(shots, int) else shots))),
                              "k (shots)", "demonstrations per prompt, e.g. 0, 1, 4", width="6em")
        self.seed = labelled(w.IntText(seed), "seed", "draws the demonstrations", width="6em")
        self.limit = labelled(w.IntText(limit or 0), "limit", "examples per group (0: all)", width="6em")
        for box in (self.shots, self.seed, self.limit):
            box.layout.width = "16em"
        self.run_button = w.Button(description="Run", button_style="primary", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.progress = w.IntProgress(value=0, min=0, max=1, layout=w.Layout(width="24em"))
        self.progress_label = w.Label("")
        self.summary_view = w.HTML()
        self.failure_picker = w.Select(options=[], rows=8, layout=w.Layout(width="100%"))
        self.failure_view = w.HTML()
        self.open_button = w.Button(description="Open in Playground", icon="external-link", disabled=True)
        self.playground_box = w.VBox()
        self.answer_views = [self.summary_view, self.failure_view]

        self.run_button.on_click(self._guarded(lambda _: self.run()))
        self.stop_button.on_click(self._guarded(lambda _: self.stop()))
        self.open_button.on_click(self._guarded(lambda _: self.open_in_playground()))
        self.failure_picker.observe(self._guarded(lambda _: self._show_failure()), "value")
        self.task_picker.observe(self._guarded(lambda _: self._show_path()), "value")
        self._show_path()
        wrap = dict(layout=w.Layout(flex_flow="row wrap", grid_gap="6px"))
        self._finish([w.HBox([self.task_picker, self.task_path], **wrap), self.template_picker,
                      w.HBox([self.shots, self.seed, self.limit], **wrap),
                      w.HBox([self.run_button, self.stop_button, self.progress, self.progress_label], **wrap),
                      self.summary_view, w.HTML("<b>failures</b> (choose one to see it)"), self.failure_picker,
                      self.failure_view, self.open_button, self.playground_box])

    # ----- settings -------------------------------------------------------------------------------

    def _show_path(self) -> None:
        self.task_path.layout.display = None if self.task_picker.value == FROM_PATH else "none"

    def task(self) -> Task:
        """The chosen task, loaded and checked (TaskError names what is wrong)."""
        if self._task_object is not None and self.task_picker.value.endswith(" (given)"):
            return self._task_object
        if self.task_picker.value == FROM_PATH:
            if not self.task_path.value.strip():
                raise ValueError("enter the path of a task file (GLM-130B .yaml, .jsonl or .csv)")
            return load_task(self.task_path.value.strip())
        return load_task(self.task_picker.value)

    def options(self) -> dict:
        """The keyword arguments of evaluate() the controls give (ValueError when one is invalid)."""
        if not self.template_picker.value:
            raise ValueError("choose at least one template ('task' is the task's own format)")
        if self.limit.value < 0:
            raise ValueError(f"limit must be >= 0 (0: every example), got {self.limit.value}")
        return {"templates": list(self.template_picker.value), "shots": parse_shots(self.shots.value),
                "seed": self.seed.value, "limit": self.limit.value or None}

    # ----- running --------------------------------------------------------------------------------

    def run(self) -> None:
        """Evaluate in the background with the current controls (what the Run button does)."""
        checked = self._begin(lambda: (self.task(), self.options()))
        if checked is None:
            return
        task, options = checked
        total = _units(task, options)
        self._done = 0
        self.progress.max, self.progress.value = max(total, 1), 0
        self.progress_label.value = f"0 / {total}"
        self.status.value = info_html(f"evaluating {task.name}…")
        self._set_running(True)
        guard = threading.Lock()

        def on_done(count: int) -> None:
            with guard:
                self._done += count
                self.progress.value = min(self._done, self.progress.max)
                self.progress_label.value = f"{self._done} / {total}"

        def work(abort) -> None:
            try:
                result = evaluate(_Counting(self.backend, on_done), task, cache=self.cache, progress=False,
                                  should_abort=abort.is_set, batch_size=self.batch_size, **options)
            except EvaluationError as error:
                self._show_result(error.result)
                raise
            self._show_result(result)
            state = "" if result.complete else f" (stopped: {result.stopped})"
            self.status.value = info_html(f"{len(result.rows)} of {total} examples evaluated{state}, "
                                          f"{result.cached} from the cache")

        self._start(work, backend_lock(self.backend), on_done=lambda: self._set_running(False))

    def _set_running(self, running: bool) -> None:
        self.run_button.disabled = running
        self.stop_button.disabled = not running

    # ----- results --------------------------------------------------------------------------------

    @property
    def failures(self) -> pd.DataFrame:
        """The rows of `result` the model got wrong (multiple choice: not correct; generation: no exact match)."""
        if self.result is None or self.result.rows.empty:
            return pd.DataFrame()
        rows = self.result.rows
        return rows[~rows[FAILED[self.result.task.kind]].astype(bool)]

    def _show_result(self, result: EvalResult) -> None:
        self.result = result
        self.progress.value = self.progress.max if result.complete else self.progress.value
        kind = result.task.kind
        self.summary_view.value = summary_html(result.summary, kind) if not result.summary.empty else ""
        options = []
        for index, row in self.failures.iterrows():
            prompt = row["prompt"].replace("\n", "↵")
            shown = prompt if len(prompt) <= PROMPT_CHARS else "…" + prompt[-PROMPT_CHARS:]
            options.append((f"{row['example']} · {row['template']} k={row['k']} · {shown} → "
                            f"{row['prediction']!r} (gold {row['gold']!r})", index))
        self.failure_picker.options = options
        self.failure_picker.value = options[0][1] if options else None
        self._show_failure()

    def _show_failure(self) -> None:
        index = self.failure_picker.value
        self.open_button.disabled = index is None
        if index is None or self.result is None:
            self.failure_view.value = ""
            return
        self.failure_view.value = failure_html(self.result.rows.loc[index], self.result.task.kind)

    def open_in_playground(self, index: int | None = None) -> Playground:
        """Put a failure's prompt (the chosen one, or `result.rows` row `index`) into the Playground, shown
        below (one made on first use, on the same backend); a generation task's stops and length come along."""
        index = self.failure_picker.value if index is None else index
        if self.result is None or index is None:
            raise ValueError("no failure chosen: run an evaluation and pick one from the list")
        if index not in self.result.rows.index:
            raise ValueError(f"no row {index} in the last result ({len(self.result.rows)} rows)")
        row, task = self.result.rows.loc[index], self.result.task
        if self.playground is None:
            self.playground = Playground(self.backend)
        settings = {"stop": list(task.stop)}
        if task.kind == "gen" and "max_new_tokens" in task.generation:
            settings["max_new_tokens"] = task.generation["max_new_tokens"]
        self.playground.set(**settings)
        self.playground.prompt.value = row["prompt"]
        self.playground_box.children = [w.HTML(f"<b>Playground</b>: {esc(str(row['example']))}"),
                                        self.playground.root]
        return self.playground

    def close(self) -> None:
        """Stop any evaluation and close the tool (and the Playground it made, not one passed in)."""
        super().close()
        if self.playground is not None and self._own_playground:
            self.playground.close()


def _units(task: Task, options: dict) -> int:
    """How many prompts evaluate() makes: the evaluated rows (the first `limit` of each group) x templates x k."""
    rows = task.rows[task.rows["split"].ne("train")]
    counts = rows.groupby("group").size()
    if options["limit"] is not None:
        counts = counts.clip(upper=options["limit"])
    return int(counts.sum()) * len(options["templates"]) * len(options["shots"])


__all__ = ["EvalWidget", "shipped_tasks", "parse_shots", "summary_html", "failure_html"]
