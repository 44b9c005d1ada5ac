"""glmkit.evaluation: task loaders, k-shot draws, metrics on the demo model, summaries and their intervals,
interrupts, the cache and lm-eval's reading of the task YAMLs (malformed data: tests/test_evaluation_malformed.py).

The evaluator's own logic (batching, interrupts, the cache, summaries) is driven by a small fake backend whose
scores follow a rule the test states; everything a model decides is checked on the shipped demo model.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import dataclass

import pandas as pd
import pytest

from glmkit.config import REPO_ROOT
from glmkit.evaluation import (EvalCache, EvaluationError, TaskError, evaluate, exact_match, from_frame,
                               load_task, token_f1, wilson_interval)
from glmkit.evaluation.prompts import build_units, resolve_templates
from glmkit.evaluation.summary import over_templates
from glmkit.widgets.templates import Example, load_template


# ----- a fake backend for the evaluator's own logic -------------------------------------------------------

@dataclass(frozen=True)
class FakeScore:
    logprob: float
    greedy: bool
    tokens: tuple
    token_logprobs: tuple


class FakeBackend:
    """Scores a choice 0.0 when the context names it as a word, else -1 - len(choice) / 10 (one token per
    character); generates the context's last word. Counts calls; can interrupt or fail at a given call."""

    config = None

    def __init__(self, interrupt_at: int | None = None, fail_at: int | None = None):
        self.calls = 0
        self.contexts: list[str] = []
        self.interrupt_at, self.fail_at = interrupt_at, fail_at

    def _tick(self):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        if self.calls == self.fail_at:
            raise ValueError("the fake backend fails here")

    def score(self, contexts, continuations, *, unidirectional=False, use_task_mask=False, **options):
        self._tick()
        self.contexts += contexts
        return [[FakeScore(0.0 if re.search(rf"\b{re.escape(c)}\b", ctx) else -1 - len(c) / 10, False,
                           tuple(range(len(c))), ()) for c in choices] for ctx, choices in zip(contexts, continuations)]

    def generate(self, prompts, *, stop=(), should_abort=None, **settings):
        self._tick()
        self.contexts += prompts
        out = []
        for p in prompts:
            words = re.findall(r"\w+", p.replace("[MASK]", ""))
            out.append(type("R", (), {"completion": " " + words[-1], "finish_reason": "end",
                                      "num_generated_tokens": 1})())
        return out


def mc_frame(n: int = 10, named: int = 7) -> pd.DataFrame:
    """n examples whose right answer is named in the context for the first `named` (the fake gets those)."""
    rows = []
    for i in range(n):
        gold, other = f"alpha{i}", f"beta{i}"
        context = f"item {i} is {gold if i < named else 'unknown'}: [MASK]"
        rows.append({"inputs": context, "choices": [other, gold], "label": 1, "kind": "even" if i % 2 else "odd"})
    return pd.DataFrame(rows)


# ----- loaders --------------------------------------------------------------------------------------------

def test_dataframe_csv_and_jsonl_load_the_same_rows(tmp_path):
    frame = pd.DataFrame({"inputs_pretokenized": ["from [MASK] import x", "a b"],
                          "choices_pretokenized": [["os", "sys"], ["c", "d", "e"]], "label": [1, 2],
                          "id": ["one", "two"]})
    frame.assign(choices_pretokenized=frame["choices_pretokenized"].map(json.dumps)).to_csv(tmp_path / "t.csv",
                                                                                            index=False)
    with open(tmp_path / "t.jsonl", "w") as f:
        for record in frame.to_dict("records"):
            f.write(json.dumps(record) + "\n")
    tasks = [from_frame(frame, name="t"), load_task(tmp_path / "t.csv"), load_task(tmp_path / "t.jsonl")]
    for task in tasks:
        assert task.kind == "mul" and list(task.rows["example"]) == ["one", "two"]
        assert list(task.rows["inputs"]) == ["from [MASK] import x", "a b"]
        assert [list(c) for c in task.rows["choices"]] == [["os", "sys"], ["c", "d", "e"]]
        assert list(task.rows["label"]) == [1, 2]
    gen = load_task(pd.DataFrame({"input": ["x = [MASK]"], "target": ["1"]}))
    assert gen.kind == "gen" and gen.rows["targets"].iloc[0] == ("1",)


def test_glm130b_yaml_groups_prompt_files_and_options(tmp_path):
    data = tmp_path / "data" / "mytask"
    (data / "test").mkdir(parents=True)
    (data / "train").mkdir()
    item = lambda i: {"inputs_pretokenized": f"q{i} [MASK]", "choices_pretokenized": ["a", "b"], "label": i % 2}
    for name, items in {"test/p1.jsonl": [0, 1, 2], "test/p2.jsonl": [3, 4], "train/pool.jsonl": [5, 6]}.items():
        (data / name).write_text("".join(json.dumps(item(i)) + "\n" for i in items) + "\n")
    (tmp_path / "mytask.yaml").write_text(
        'name: "MyTask"\ntype: "mul"\npath: "mytask"\nmodule: "tasks.x.MyTask"\nmicro-batch-size: 8\n'
        'max_seq-length: 300\nuse_task_mask: true\nunidirectional: true\n'
        'file-pattern:\n  test: "test/*.jsonl"\n  train: "train/*.jsonl"\n')
    task = load_task(tmp_path / "mytask.yaml", data_root=tmp_path / "data")
    assert task.name == "MyTask" and task.use_task_mask and task.unidirectional and task.max_seq_length == 300
    assert any("module" in note for note in task.notes)
    evaluated = task.eval_rows
    assert list(evaluated["prompt_name"]) == ["test/p1"] * 3 + ["test/p2"] * 2
    assert evaluated["where"].iloc[4] == "test/p2.jsonl line 2"
    assert list(task.train_rows["inputs"]) == ["q5 [MASK]", "q6 [MASK]"]
    gen_yaml = tmp_path / "gen.yaml"
    (data / "g.jsonl").write_text(json.dumps({"inputs_pretokenized": "x", "targets_pretokenized": ["y"]}) + "\n")
    gen_yaml.write_text("name: g\ntype: gen\npath: data/mytask\nfile-pattern: g.jsonl\n"
                        "sampling_strategy: BeamSearchStrategy\nnum_beams: 3\nmax_gen_length: 5\n")
    gen = load_task(gen_yaml)  # path relative to the YAML's folder
    assert gen.generation == {"max_new_tokens": 5, "min_new_tokens": 0, "num_beams": 3, "length_penalty": 1.0,
                              "no_repeat_ngram_size": 3}
    assert gen.rows["group"].iloc[0] == "all"


def test_shipped_tasks_have_one_blank_and_valid_labels():
    mc, gen = load_task("stdlib-mc"), load_task("stdlib-completion")
    assert (mc.kind, len(mc.eval_rows), gen.kind, len(gen.eval_rows)) == ("mul", 210, "gen", 100)
    assert set(mc.rows["group"]) == {"import_module", "first_param"}
    assert set(gen.rows["group"]) == {"import_name", "loop_variable", "self_assign"}
    for task in (mc, gen):
        assert all(text.count("[MASK]") == 1 for text in task.rows["inputs"])
    for _, row in mc.rows[mc.rows["group"] == "import_module"].iterrows():
        assert len(set(row["choices"])) == 4 and row["choices"][row["label"]] in row["choices"]
    assert {row["choices"][row["label"]] for _, row in mc.rows[mc.rows["group"] == "first_param"].iterrows()} >= {
        "self", "cls"}


def test_task_rules_over_a_synthetic_source():
    spec = importlib.util.spec_from_file_location("make_eval_tasks", REPO_ROOT / "scripts" / "make_eval_tasks.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    source = ("import os\nimport json\nfrom collections import OrderedDict\nDUMP = json.dumps\n\n\nclass A:\n    @classmethod\n"
              "    def make(cls, x):\n        return cls(x)\n\n    def __init__(self, value):\n"
              "        self.value = value\n\n\ndef f(items):\n    for item in items:\n        print(item)\n"
              "    return json.dumps(items)\n")
    other = "".join(f"from mod{i} import thing{i}\n" for i in range(4)) * 20 + "from typing import OrderedDict\n"
    files = [("pkg/a.py", source.split("\n"), ast.parse(source), "heldout"),
             ("pkg/b.py", other.split("\n"), ast.parse(other), "train")]
    [mc] = [it for it in script.import_module_items(files) if it["path"] == "pkg/a.py"]
    assert mc["inputs_pretokenized"].splitlines()[2] == "from [MASK] import OrderedDict"
    assert mc["choices_pretokenized"][mc["label"]] == "collections"
    assert "typing" not in mc["choices_pretokenized"]  # typing provides OrderedDict too: never a distractor
    params = {it["choices_pretokenized"][it["label"]]: it for it in script.first_param_items(files)}
    assert set(params) == {"cls", "self"} and "def make([MASK], x):" in params["cls"]["inputs_pretokenized"]
    assert [(it["targets_pretokenized"], it["inputs_pretokenized"].splitlines()[0])
            for it in script.loop_variable_items(files)] == [(["item"], "    for [MASK] in items:")]
    assert [it["targets_pretokenized"] for it in script.self_assign_items(files)] == [["value"]]
    assert [(it["targets_pretokenized"], it["inputs_pretokenized"]) for it in script.import_name_items(files)] == [
        (["json"], "import os\nimport [MASK]\nfrom collections import OrderedDict\nDUMP = json.dumps")]  # os: unused


# ----- k-shot draws ---------------------------------------------------------------------------------------

def _shots(task, k, seed, templates=None):
    units = build_units(task, resolve_templates(templates), [k], seed)
    return {task.rows["example"].iloc[u.position]: u.shots for u in units}


def test_shots_are_seeded_nested_and_never_the_example_itself():
    task = from_frame(mc_frame(12), name="t")
    four = _shots(task, 4, seed=0)
    assert four == _shots(task, 4, seed=0)
    assert four != _shots(task, 4, seed=1)
    assert all(example not in shots and len(set(shots)) == 4 for example, shots in four.items())
    assert all(_shots(task, 1, 0)[e] == s[:1] for e, s in four.items())  # 1 shot is the first of the 4
    with pytest.raises(TaskError, match=r"row 0: 12 shots .* only 11 other examples"):
        _shots(task, 12, 0)


def test_shots_come_from_train_rows_and_the_prompt_shows_them():
    frame = mc_frame(6).assign(split=["train", "train", "train", "test", "test", "test"])
    task = from_frame(frame, name="t")
    shots = _shots(task, 2, seed=3)
    assert set(shots) == {"row 3", "row 4", "row 5"}
    assert all(set(s) <= {"row 0", "row 1", "row 2"} for s in shots.values())
    unit = build_units(task, resolve_templates(None), [2], 3)[0]
    first = task.rows.set_index("example").loc[unit.shots[0]]
    assert unit.prompt.startswith(first["inputs"].replace("[MASK]", first["choices"][first["label"]]) + "\n\n")
    assert unit.prompt.endswith("\n\n" + task.rows["inputs"].iloc[3])


# ----- metrics on the demo model --------------------------------------------------------------------------

def test_multiple_choice_rows_are_the_models_scores(pipeline):
    result = evaluate(pipeline, "stdlib-mc", limit=2, progress=False)
    assert result.complete and len(result.rows) == 4
    for _, row in result.rows.iterrows():
        scores = pipeline.score(row["prompt"], row["choices"])
        assert row["logprobs"] == pytest.approx([s.logprob for s in scores], abs=1e-5)
        assert row["logprobs_per_token"] == pytest.approx([s.logprob / len(s.tokens) for s in scores], abs=1e-5)
        assert row["logprobs_per_char"] == pytest.approx([s.logprob / len(c) for s, c in zip(scores, row["choices"])],
                                                         abs=1e-5)
        best = max(range(len(scores)), key=lambda i: scores[i].logprob)
        assert row["prediction"] == row["choices"][best]
        assert row["correct"] == (best == row["label"]) and row["tokens"] == sum(len(s.tokens) for s in scores)


def test_generation_rows_are_the_models_completions(pipeline):
    task = load_task("stdlib-completion")
    result = evaluate(pipeline, task, limit=1, progress=False)
    assert len(result.rows) == 3
    for _, row in result.rows.iterrows():
        direct = pipeline.generate(row["prompt"], stop=list(task.stop), max_new_tokens=8)
        assert row["completion"] == direct.completion and row["prediction"] == direct.completion.strip()
        assert row["exact"] == (row["prediction"] == row["gold"])
    summary = result.summary.set_index("group")
    for group, part in result.rows.groupby("group"):
        assert summary.loc[group, "exact"] == part["exact"].mean()


def test_template_tasks_score_and_generate_as_the_template_does(pipeline):
    pairs = pd.DataFrame({"input": ["house", "water"], "target": ["Haus", "Wasser"]})
    template = load_template("en-de-translation")
    result = evaluate(pipeline, pairs, templates=[template], shots=[1], seed=0, progress=False,
                      generation={"max_new_tokens": 6})
    for _, row in result.rows.iterrows():
        [shot] = row["shots"]
        demo, query = pairs.loc[int(shot.split()[1])], pairs.loc[int(row["example"].split()[1]), "input"]
        assert demo["input"] != query
        shaped = dataclasses.replace(template, examples=[Example(demo["input"], demo["target"])])
        assert row["prompt"] == shaped.build_prompt(query)
        assert row["prediction"] == shaped.run(pipeline, [query], max_new_tokens=6)["answer"].iloc[0]
    choices = pairs.assign(choices=[["Haus", "Baum"], ["Wasser", "Haus"]], label=[0, 0])
    mc = evaluate(pipeline, choices.drop(columns="target"), templates=template, progress=False)
    for _, row in mc.rows.iterrows():  # a template without a mask is scored as a [gMASK] continuation
        direct = pipeline.score(row["prompt"], row["choices"], use_task_mask=True)
        assert row["logprobs"] == pytest.approx([s.logprob for s in direct], abs=1e-5)


@pytest.fixture(scope="module")
def cluster():
    from glmkit.serve.cluster import GLMCluster

    with GLMCluster(config="glm-tiny", n=2) as running:
        yield running


def test_a_cluster_evaluates_as_the_pipeline_does(cluster, pipeline):
    for name in ("stdlib-mc", "stdlib-completion"):
        remote = evaluate(cluster, name, limit=1, progress=False, cache=EvalCache())
        local = evaluate(pipeline, name, limit=1, progress=False, cache=EvalCache())
        assert remote.rows["prediction"].tolist() == local.rows["prediction"].tolist()
        if "logprobs" in local.rows:
            for a, b in zip(remote.rows["logprobs"], local.rows["logprobs"]):
                assert a == pytest.approx(b, abs=1e-4)


def test_exact_match_and_f1_by_hand():
    assert exact_match("The  Cat!", ["cat"]) and not exact_match("cats", ["cat"])
    assert token_f1("the black cat sat", ["a cat sat down"]) == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert token_f1("dog", ["cat", "dog house"]) == pytest.approx(2 * 1 * 0.5 / 1.5)


# ----- summaries and intervals ----------------------------------------------------------------------------

def test_wilson_interval_against_scipy_and_a_worked_case():
    # 8 of 10: centre (0.8 + 1.92/20) / 1.384 = 0.6474, half 1.96 * sqrt(0.016 + 0.0096) / 1.384 = 0.2266
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 5), (5, 5), (3, 7), (70, 100), (1, 300)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_summary_counts_and_max_median_over_templates():
    backend = FakeBackend()
    own = load_template("en-python")
    result = evaluate(backend, mc_frame(10, named=7).assign(inputs=lambda f: f["inputs"].str.replace(": [MASK]", "")),
                      templates=[None, own], progress=False, model_id="fake", by=["kind"])
    summary = result.summary.set_index(["template", "kind"])
    assert summary.loc[("task", "odd"), "n"] == 5 and summary.loc[("task", "odd"), "accuracy"] == 4 / 5
    assert summary.loc[("task", "even"), "accuracy"] == 3 / 5
    assert summary.loc[("task", "even"), "chance"] == 0.5
    plain = evaluate(backend, mc_frame(10, named=7), progress=False, model_id="fake")
    assert "10 rows, complete" in repr(plain)
    overall = plain.summary
    assert overall["accuracy"].iloc[0] == 0.7
    assert (overall["accuracy_low"].iloc[0], overall["accuracy_high"].iloc[0]) == pytest.approx(wilson_interval(7, 10))
    table = pd.DataFrame({"group": ["g"] * 3, "template": ["a", "b", "c"], "k": [0, 0, 0], "n": [10, 30, 60],
                          "accuracy": [0.9, 0.5, 0.6]})
    report = over_templates(table, "mul").iloc[0]
    assert (report["accuracy_max"], report["accuracy_median"], report["best_template"]) == (0.9, 0.6, "a")
    assert report["accuracy_average"] == pytest.approx((9 + 15 + 36) / 100)


# ----- interrupts, errors and the cache -------------------------------------------------------------------

def test_interrupt_keeps_the_finished_rows_and_the_rerun_resumes():
    full = evaluate(FakeBackend(), mc_frame(6), batch_size=1, progress=False, model_id="fake")
    cache = EvalCache()
    stopped = evaluate(FakeBackend(interrupt_at=3), mc_frame(6), batch_size=1, progress=False, model_id="fake",
                       cache=cache)
    assert not stopped.complete and stopped.stopped == "interrupted" and not stopped.rows.attrs["complete"]
    assert list(stopped.rows["example"]) == ["row 0", "row 1"]
    assert stopped.rows["logprobs"].tolist() == full.rows["logprobs"].iloc[:2].tolist()
    backend = FakeBackend()
    resumed = evaluate(backend, mc_frame(6), batch_size=1, progress=False, model_id="fake", cache=cache)
    assert resumed.complete and backend.calls == 4 and resumed.rows["cached"].tolist() == [True] * 2 + [False] * 4
    calls = []
    aborted = evaluate(FakeBackend(), mc_frame(6), batch_size=2, progress=False, model_id="fake",
                       should_abort=lambda: calls.append(1) or len(calls) > 2)
    assert aborted.stopped == "aborted" and len(aborted.rows) == 4


def test_a_backend_failure_names_the_example_and_keeps_what_was_done():
    cache = EvalCache()
    with pytest.raises(EvaluationError, match=r"row 2 \(template 'task', 0 shots\).*fake backend fails") as error:
        evaluate(FakeBackend(fail_at=3), mc_frame(5), batch_size=1, progress=False, model_id="fake", cache=cache)
    assert list(error.value.result.rows["example"]) == ["row 0", "row 1"] and len(cache) == 2


def test_rerun_is_served_from_the_cache_in_memory_and_on_disk(tmp_path):
    backend = FakeBackend()
    first = evaluate(backend, mc_frame(4), shots=[0, 1], seed=5, progress=False, model_id="fake",
                     cache=EvalCache(tmp_path))
    calls = backend.calls
    again = evaluate(backend, mc_frame(4), shots=[0, 1], seed=5, progress=False, model_id="fake",
                     cache=EvalCache(tmp_path))  # a new cache object reads the folder
    assert backend.calls == calls and again.cached == 8 and again.rows["cached"].all()
    pd.testing.assert_frame_equal(first.rows.drop(columns="cached"), again.rows.drop(columns="cached"))
    evaluate(backend, mc_frame(4), shots=[0, 1], seed=6, progress=False, model_id="fake", cache=EvalCache(tmp_path))
    assert backend.calls > calls  # another seed draws other shots: other prompts
    other = FakeBackend()
    evaluate(other, mc_frame(4), shots=[0, 1], seed=5, progress=False, model_id="other", cache=EvalCache(tmp_path))
    assert other.calls > 0  # another model


class Counting:
    """The demo pipeline, counting its score calls (a wrapper, not a fake: the scores are the model's)."""

    def __init__(self, pipeline):
        self.pipeline, self.calls = pipeline, 0
        self.config, self.tokenizer, self.model = pipeline.config, pipeline.tokenizer, pipeline.model

    def score(self, *args, **kwargs):
        self.calls += 1
        return self.pipeline.score(*args, **kwargs)


def test_cache_keys_on_the_demo_models_identity(pipeline):
    counting, cache = Counting(pipeline), EvalCache()
    first = evaluate(counting, "stdlib-mc", limit=1, progress=False, cache=cache)
    assert counting.calls == 1 and first.cached == 0  # one example of each group: one batch
    again = evaluate(counting, "stdlib-mc", limit=1, progress=False, cache=cache)
    assert counting.calls == 1 and again.cached == 2
    assert again.rows["logprobs"].tolist() == first.rows["logprobs"].tolist()


# ----- lm-evaluation-harness YAMLs ------------------------------------------------------------------------

LM_EVAL_CHECK = """
import json, sys
from lm_eval.tasks import TaskManager
manager = TaskManager(include_path="configs/tasks/lm-eval", include_defaults=False)  # not lm-eval's own tasks
tasks = manager.load(["glmkit_stdlib_mc", "glmkit_stdlib_completion"])["tasks"]
out = {}
for name, task in tasks.items():
    docs = list(task.test_docs())
    task.set_fewshot_seed(0)
    out[name] = {"n": len(docs), "text": task.doc_to_text(docs[0]), "target": task.doc_to_target(docs[0]),
                 "choices": task.doc_to_choice(docs[0]) if task.OUTPUT_TYPE == "multiple_choice" else None,
                 "one_shot": task.fewshot_context(docs[0], 1)}
print(json.dumps(out))
"""


def test_lm_eval_yamls_read_the_shipped_items(tmp_path):
    pytest.importorskip("lm_eval")
    env = {"HF_DATASETS_CACHE": str(tmp_path), "HF_HOME": str(tmp_path), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", LM_EVAL_CHECK], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    mc, gen = out["glmkit_stdlib_mc"], out["glmkit_stdlib_completion"]
    assert (mc["n"], gen["n"]) == (210, 100)
    first = json.loads((REPO_ROOT / "configs/tasks/stdlib-mc/import_module.jsonl").read_text().splitlines()[0])
    assert (mc["text"], mc["choices"], mc["target"]) == (first["inputs_pretokenized"], first["choices_pretokenized"],
                                                         first["label"])
    shot = mc["one_shot"][:-len(mc["text"])]
    assert mc["one_shot"].endswith(mc["text"]) and shot.endswith("\n\n") and shot.strip()
    assert "[MASK]" not in shot  # the demonstration has its blank filled in
    assert gen["text"].count("[MASK]") == 1 and gen["one_shot"].endswith("\n\n" + gen["text"])
