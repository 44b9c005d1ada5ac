"""glmkit.evaluation on malformed data: rows, task YAMLs and files that are wrong, and a seeded fuzz of rows,
each refused with a TaskError naming the row and field (or key, or line) before any model call."""
from __future__ import annotations

import json
import random

import pandas as pd
import pytest

from glmkit.evaluation import TaskError, evaluate, load_task

from test_evaluation import FakeBackend

# ----- malformed data -------------------------------------------------------------------------------------

MALFORMED = [  # (rows, the message: names the row and the field)
    ([{"inputs": "a", "choices": ["x", "y"]}], r"column 'label' .* is missing"),
    ([{"inputs": "a", "choices": ["x", "y"], "label": 0}, {"inputs": "b", "choices": ["x"], "label": 3}],
     r"row 1: field 'label' is 3, out of range for 1 choices"),
    ([{"inputs": "a", "choices": [], "label": 0}], r"row 0: field 'choices' is an empty list"),
    ([{"inputs": "a", "choices": ["x", ""], "label": 0}], r"row 0: field 'choices\[1\]' is empty"),
    ([{"inputs": "a", "choices": ["x", "x"], "label": 0}], r"row 0: field 'choices' repeats 'x'"),
    ([{"inputs": None, "choices": ["x"], "label": 0}], r"row 0: field 'inputs' is missing"),
    ([{"inputs": "a [MASK] b [MASK]", "choices": ["x"], "label": 0}], r"row 0: field 'inputs' holds 2 masks"),
    ([{"inputs": "a [mask]", "choices": ["x"], "label": 0}], r"row 0: field 'inputs': malformed mask"),
    ([{"inputs": "a", "choices": ["x [MASK]"], "label": 0}], r"row 0: field 'choices\[0\]' holds \[MASK\]"),
    ([{"inputs": "a", "choices": ["x"], "label": "first"}], r"row 0: field 'label' must be an integer"),
    ([{"inputs": "a", "targets": []}], r"row 0: field 'targets' is an empty list"),
    ([{"inputs": [101, 102], "targets": ["x"]}], r"row 0: field 'inputs' must be a string.*token ids"),
]


@pytest.mark.parametrize("rows,message", MALFORMED)
def test_malformed_rows_name_the_row_and_field(rows, message):
    with pytest.raises(TaskError, match=message):
        load_task(pd.DataFrame(rows))


@pytest.mark.parametrize("text,message", [
    ("name: x\ntype: mul\n", r"key 'path' is missing"),
    ("name: x\ntype: lm\npath: .\n", r"type 'lm' is not supported"),
    ("name: x\ntype: mul\npath: .\nfile-pattern: {a: nothing*.jsonl}\n", r"'a': 'nothing\*.jsonl' matches no file"),
    ("name: x\ntype: mul\npath: .\nfile_pattern: a.jsonl\nfile-pattern: b.jsonl\n", r"given twice"),
    ("name: x\ntype: mul\npath: .\nuse_task_mask: 'yes'\nfile-pattern: '*.jsonl'\n", r"use_task_mask must be true or false"),
    ("name: x\ntype: gen\npath: .\nsampling_strategy: Nucleus\nfile-pattern: '*.jsonl'\n", r"sampling_strategy"),
    ("- just a list\n", r"must be a mapping"),
])
def test_malformed_task_yamls_name_the_key(tmp_path, text, message):
    (tmp_path / "d.jsonl").write_text(json.dumps({"inputs_pretokenized": "q", "choices_pretokenized": ["a"],
                                                  "targets_pretokenized": "a", "label": 0}) + "\n")
    (tmp_path / "t.yaml").write_text(text)
    with pytest.raises(TaskError, match=message):
        load_task(tmp_path / "t.yaml")


def test_malformed_files_and_misfits_name_where(tmp_path, pipeline):
    (tmp_path / "t.jsonl").write_text('{"inputs_pretokenized": "a", "targets_pretokenized": ["b"]}\n{"oops"\n')
    with pytest.raises(TaskError, match=r"t.jsonl line 2: not valid JSON"):
        load_task(tmp_path / "t.jsonl")
    (tmp_path / "t.csv").write_text('inputs,choices,label\nq,"[""a"", ""b""]",1\nq2,"[""a""]",1\n')
    with pytest.raises(TaskError, match=r"t.csv line 3: field 'label' is 1, out of range"):
        load_task(tmp_path / "t.csv")
    masked = pd.DataFrame({"inputs": ["from [MASK] import x"], "targets": ["os"]})
    backend = FakeBackend()
    with pytest.raises(TaskError, match=r"row 0: field 'inputs' holds a mask, which does not fit template"):
        evaluate(backend, masked, templates="en-de-translation", progress=False, model_id="fake")
    long = pd.DataFrame({"inputs": ["x = 1\n" * 10, "word " * 700], "choices": [["a", "b"]] * 2, "label": [0, 0]})
    with pytest.raises(TaskError, match=r"row 1 \(template 'task', 0 shots\): field 'inputs' makes a prompt of \d+ "
                                        r"tokens .* at most 512"):
        evaluate(pipeline, long, progress=False)
    with pytest.raises(TaskError, match=r"3 shots asked for"):
        evaluate(backend, long, shots=[0, 3], progress=False, model_id="fake")
    assert backend.calls == 0  # every check came before any model call


# ----- fuzz -----------------------------------------------------------------------------------------------

FUZZ_SEED = 20261202
FUZZ_CASES = 300
_BAD_FIELDS = {  # field -> (bad values, what the message must say about it)
    "inputs": ([None, 5, ["a"], "two [MASK] [MASK]", "[gmask] x", "x\ud800"], "'inputs'"),
    "choices": ([None, [], "x", ["a", ""], ["a", "a"], ["a", 3], ["[sMASK]"], "[1, 2"], "'choices"),
    "label": ([None, -1, 7, "x", 1.5, True, [0]], "'label'"),
}


def _valid_record(rng: random.Random) -> dict:
    choices = [f"c{j}{rng.choice('xyz')}" for j in range(rng.randint(1, 4))]
    text = rng.choice(["", "plain", "a [MASK] b", "end [MASK]", "[gMASK]", "uni ü 中"])
    return {"inputs": text, "choices": choices, "label": rng.randrange(len(choices)), "note": rng.random()}


def test_fuzz_malformed_rows_fail_naming_row_and_field_before_any_call():
    rng = random.Random(FUZZ_SEED)
    for case in range(FUZZ_CASES):
        rows = [_valid_record(rng) for _ in range(rng.randint(1, 5))]
        bad = rng.random() < 0.7
        if bad:
            at, field = rng.randrange(len(rows)), rng.choice(sorted(_BAD_FIELDS))
            values, named = _BAD_FIELDS[field]
            rows[at][field] = rng.choice(values)
            if field == "label" and rows[at]["label"] in (-1, 7) and 0 <= rows[at]["label"] < len(rows[at]["choices"]):
                bad = False
        backend = FakeBackend()
        try:
            # a list of dicts: a DataFrame could not even hold a lone surrogate (pandas' arrow strings refuse it)
            result = evaluate(backend, rows, progress=False, model_id="fake")
        except TaskError as error:
            assert bad, f"case {case}: valid rows refused: {error}"
            assert f"row {at}:" in str(error) and named in str(error), f"case {case}: {error}"
            assert backend.calls == 0
            continue
        assert not bad, f"case {case}: malformed rows accepted: {rows}"
        assert result.complete and len(result.rows) == len(rows)
