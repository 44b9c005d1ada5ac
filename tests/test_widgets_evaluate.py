"""The evaluation tool (glmkit.widgets.evaluate.EvalWidget): glmkit's evaluate() run from the widget on the
demo model, its summary, failures and the way into the Playground; Stop and bad controls with a slow fake."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from glmkit.evaluation import EvalCache, evaluate
from glmkit.widgets.evaluate import EvalWidget, parse_shots, shipped_tasks
from glmkit.widgets.render import esc


def run_to_end(tool: EvalWidget, seconds: float = 300) -> None:
    tool.run()
    assert tool.wait(seconds), "the evaluation did not finish"
    assert tool.last_error is None, tool.last_error


def test_shipped_tasks_are_the_glm130b_ones():
    assert shipped_tasks() == ["stdlib-completion", "stdlib-mc"]  # configs/tasks/lm-eval is lm-eval's format


def test_the_widget_runs_evaluate_and_lists_the_failures(pipeline):
    tool = EvalWidget(pipeline, "stdlib-mc", shots=[0, 1], limit=4)
    run_to_end(tool)
    direct = evaluate(pipeline, "stdlib-mc", shots=[0, 1], limit=4, progress=False)
    rows = tool.result.rows
    assert len(rows) == 16  # 4 per group, 2 groups, 2 values of k
    assert list(rows["prediction"]) == list(direct.rows["prediction"])
    assert tool.progress.value == tool.progress.max == 16 and tool.progress_label.value == "16 / 16"
    for _, line in tool.result.summary.iterrows():  # the accuracy and its interval, per group and k
        assert f"{line['accuracy']:.3f}" in tool.summary_view.value
        assert f"[{line['accuracy_low']:.3f}, {line['accuracy_high']:.3f}]" in tool.summary_view.value
    failures = rows[~rows["correct"]]
    assert len(tool.failure_picker.options) == len(failures) > 0
    chosen = failures.index[-1]
    tool.failure_picker.value = chosen
    assert esc(failures.loc[chosen, "gold"]) in tool.failure_view.value and "✘ picked" in tool.failure_view.value
    tool.open_button.click()
    assert tool.last_error is None, tool.last_error
    assert tool.playground.prompt.value == failures.loc[chosen, "prompt"]
    assert tool.playground.root in tool.playground_box.children
    run_to_end(tool)  # the same evaluation again: every example from the widget's cache
    assert tool.result.cached == 16 and list(tool.result.rows["prediction"]) == list(rows["prediction"])
    tool.close()
    assert tool.playground.root.comm is None


def test_a_generation_failure_opens_with_the_tasks_stop_and_length(pipeline):
    tool = EvalWidget(pipeline, "stdlib-completion", limit=2)
    run_to_end(tool)
    assert "exact_match" in tool.summary_view.value
    failures = tool.failures
    assert len(failures) == (~tool.result.rows["exact_match"]).sum() > 0
    playground = tool.open_in_playground(failures.index[0])
    assert playground.settings()["stop"] == list(tool.result.task.stop) and "\n" in tool.result.task.stop
    assert playground.settings()["max_new_tokens"] == tool.result.task.generation["max_new_tokens"]
    tool.close()


@dataclass(frozen=True)
class _Score:
    logprob: float
    greedy: bool
    tokens: tuple


class SlowScorer:
    """A backend whose score() takes `delay` seconds a call (the widget's own behaviour: never blocking,
    Stop); it has no config, so nothing is cached."""

    def __init__(self, tokenizer, delay: float):
        self.tokenizer, self.delay, self.calls = tokenizer, delay, 0

    def score(self, contexts, continuations, **options):
        self.calls += 1
        time.sleep(self.delay)
        return [[_Score(-float(len(c)), False, (1,)) for c in choices] for choices in continuations]

    def generate(self, prompts, **kwargs):
        raise AssertionError("a multiple-choice task never generates")


def test_run_returns_at_once_and_stop_keeps_what_is_finished(tokenizer):
    backend = SlowScorer(tokenizer, delay=0.3)
    tool = EvalWidget(backend, "stdlib-mc", limit=20)
    started = time.perf_counter()
    tool.run()
    assert time.perf_counter() - started < 0.5 and tool.running and tool.run_button.disabled
    while backend.calls < 2:
        time.sleep(0.05)
    tool.stop_button.click()
    assert tool.wait(10)
    assert not tool.result.complete and tool.result.stopped == "aborted"
    assert 0 < len(tool.result.rows) < 40 and "stopped: aborted" in tool.status.value
    assert not tool.run_button.disabled and tool.stop_button.disabled


def test_a_second_run_while_running_says_press_stop_and_starts_nothing(tokenizer):
    backend = SlowScorer(tokenizer, delay=0.3)
    tool = EvalWidget(backend, "stdlib-mc", limit=20)
    tool.run()
    running = tool._thread
    tool.run()
    assert "press Stop first" in tool.status.value and tool._thread is running
    tool.stop()
    assert tool.wait(10)


@pytest.mark.parametrize("control, value, message", [
    ("shots", "0, x", "k (shots) must be whole numbers"),
    ("shots", "1, 1", "repeats"),
    ("limit", -1, "limit must be >= 0"),
    ("template_picker", (), "choose at least one template"),
    ("task_picker", "(a file: enter its path)", "enter the path of a task file"),
])
def test_bad_controls_show_a_message_and_start_nothing(tokenizer, control, value, message):
    backend = SlowScorer(tokenizer, delay=0)
    tool = EvalWidget(backend, "stdlib-mc")
    getattr(tool, control).value = value
    tool.run_button.click()
    assert not tool.running and backend.calls == 0
    assert esc(message) in tool.status.value


def test_a_task_error_names_the_row(tokenizer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"inputs": "a [MASK]", "choices": ["x", "y"], "label": 5}\n')
    tool = EvalWidget(SlowScorer(tokenizer, delay=0), bad)
    assert tool.task_path.value == str(bad)
    tool.run()
    assert "label" in tool.status.value and not tool.running


def test_shots_parse_from_text():
    assert parse_shots("0, 1,4") == [0, 1, 4] and parse_shots(" 2 ") == [2]
