"""glmkit's model class for lm-evaluation-harness (glmkit.evaluation.lm_eval_model), run through the real
`lm_eval.simple_evaluate` on local task YAMLs (tests/data/lm_eval) with the demo model: its answers must be
what glmkit's own score() and generate() give for the same text."""
from __future__ import annotations

import math
import os
import random
from pathlib import Path

# Local tasks only: the datasets library reads these when it is first imported (by lm_eval), so no call
# ever waits on the network for the hub.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402 - after the offline switches
import pytest  # noqa: E402
import torch  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from glmkit.evaluation import evaluate  # noqa: E402
from glmkit.evaluation.lm_eval_model import GLMKitLM, rolling_windows  # noqa: E402
from glmkit.generate.scoring import Tokens  # noqa: E402
from glmkit.serve.cluster import GLMCluster  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests" / "data" / "lm_eval"
LONG_TEXT = (ROOT / "tests" / "data" / "heldout_xml_dom_pulldom.py.txt").read_text()[:4000]


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=str(TASKS), include_defaults=False)


@pytest.fixture(scope="module")
def lm(pipeline):
    return GLMKitLM(pipeline, batch_size=4, progress=False)


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the YAMLs' data_files are relative to the repository root, as the shipped ones


def run_lm_eval(model, task_manager, tasks, **kwargs):
    return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=task_manager, log_samples=True,
                                   bootstrap_iters=0, **kwargs)


def request(kind: str, *args, index: int = 0) -> Instance:
    return Instance(kind, doc={}, arguments=tuple(args), idx=0, metadata=("a_task", index, 1))


def direct_choice(pipeline, context: str, continuations: list[str]) -> tuple[int, list[float]]:
    """The choice glmkit's score() picks for lm-eval's (context, continuation) pairs, each choice given as
    GLM-130B gives a choice: its text on its own (the dummy prefix is the word's leading space)."""
    scores = pipeline.score(context, [c[1:] if c.startswith(" ") else c for c in continuations])
    values = [s.logprob for s in scores]
    return max(range(len(values)), key=values.__getitem__), values


def test_simple_evaluate_picks_the_choice_score_picks(pipeline, lm, task_manager, at_root):
    results = run_lm_eval(lm, task_manager, ["glmkit_test_translate_mc"], num_fewshot=1)
    samples = results["samples"]["glmkit_test_translate_mc"]
    assert len(samples) == 6
    correct = []
    for sample in samples:
        context = sample["arguments"][0][0]
        assert context.count("English:") == 2  # one shot and the question
        picked = max(range(len(sample["filtered_resps"])), key=lambda i: sample["filtered_resps"][i][0])
        chosen, values = direct_choice(pipeline, context, [a[1] for a in sample["arguments"]])
        assert picked == chosen
        assert [r[0] for r in sample["filtered_resps"]] == pytest.approx(values, abs=1e-4)
        correct.append(chosen == sample["doc"]["label"])
    assert results["results"]["glmkit_test_translate_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    assert sum(correct) >= 4  # words the demo model saw paired: well above the 1/4 of chance


def test_a_context_with_a_mask_has_its_blank_scored(pipeline, lm, task_manager, at_root):
    samples = run_lm_eval(lm, task_manager, ["glmkit_test_code_blank_mc"])["samples"]["glmkit_test_code_blank_mc"]
    for sample in samples:
        context = sample["arguments"][0][0]
        assert "[MASK]" in context
        picked = max(range(len(sample["filtered_resps"])), key=lambda i: sample["filtered_resps"][i][0])
        assert picked == direct_choice(pipeline, context, [a[1] for a in sample["arguments"]])[0]


def test_generate_until_is_generate_with_until_as_stop(pipeline, lm, task_manager, at_root):
    samples = run_lm_eval(lm, task_manager, ["glmkit_test_translate_gen"])["samples"]["glmkit_test_translate_gen"]
    for sample in samples:
        (context, gen_kwargs), = sample["arguments"]
        text = sample["resps"][0][0]
        assert "\n" not in text
        assert text == pipeline.generate(context, max_new_tokens=gen_kwargs["max_gen_toks"], stop=["\n"]).completion


def test_generate_until_cuts_before_the_until_string(pipeline, lm):
    context = "def parse(self, text):\n"
    free = pipeline.generate(context, max_new_tokens=16).completion
    until = next(c for c in free[2:] if not c.isspace())  # a character the free text holds past its start
    out, = lm.generate_until([request("generate_until", context, {"until": [until], "max_gen_toks": 16})])
    assert out == free[:free.index(until)]


def test_loglikelihood_rolling_of_a_short_text_is_its_unidirectional_score(pipeline, lm):
    text = "import os\nprint(os.getcwd())\n"
    value, = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    assert value == pytest.approx(pipeline.score("", text, unidirectional=True, use_task_mask=True).logprob,
                                  abs=1e-5)
    empty, = lm.loglikelihood_rolling([request("loglikelihood_rolling", "")])
    assert empty == 0.0


def test_loglikelihood_rolling_windows_a_text_longer_than_the_model(pipeline, lm):
    ids = pipeline.tokenizer.encode(LONG_TEXT)
    assert len(ids) > 2 * pipeline.model.config.max_sequence_length
    with pytest.raises(ValueError, match="takes at most"):
        pipeline.score("", LONG_TEXT, unidirectional=True, use_task_mask=True)
    value, = lm.loglikelihood_rolling([request("loglikelihood_rolling", LONG_TEXT)])
    first_context, first = rolling_windows(ids, pipeline.model.config.max_sequence_length)[0]
    alone = pipeline.tokenizer.decode(first)
    assert first_context == () and math.isfinite(value)
    assert value < lm.loglikelihood_rolling([request("loglikelihood_rolling", alone)])[0] < 0


def test_rolling_windows_predict_every_token_once_within_the_model():
    rng = random.Random(20261205)
    for _ in range(300):
        length, n = rng.randint(3, 40), rng.randint(0, 200)
        ids = [rng.randrange(1000) for _ in range(n)]
        windows = rolling_windows(ids, length)
        predicted = [t for _, continuation in windows for t in continuation]
        assert predicted == ids
        start = 0
        for number, (context, continuation) in enumerate(windows):
            assert len(context) + len(continuation) + 1 <= length  # [gMASK] sop, less the shared position
            assert context == tuple(ids[start - len(context):start])  # the text just before, as context
            assert number == 0 or context  # only the first window starts from [gMASK] sop alone
            start += len(continuation)
        if n > length - 2:  # the last window reads as much of the text before it as fits
            context, continuation = windows[-1]
            assert len(context) + len(continuation) + 1 == length


def test_pretrained_model_args_load_the_named_config(task_manager, at_root):
    results = run_lm_eval("glmkit", task_manager, ["glmkit_test_code_blank_mc"],
                       model_args="pretrained=glm-tiny,batch_size=2,progress=False", limit=2)
    assert results["results"]["glmkit_test_code_blank_mc"]["sample_len"] == 2


def test_shared_contexts_are_scored_in_one_row(pipeline, lm):
    context = "English: water\nGerman:"
    requests = [request("loglikelihood", context, f" {word}", index=i)
                for i, word in enumerate(["Wasser", "Haus", "Baum"])]
    grouped = lm.loglikelihood(requests)
    one_by_one = [lm.loglikelihood([r])[0] for r in requests]
    assert [g[0] for g in grouped] == pytest.approx([o[0] for o in one_by_one], abs=1e-4)
    assert [g[1] for g in grouped] == [o[1] for o in one_by_one]
    # Trailing whitespace of a context belongs to the continuation, as lm-eval's own models read it.
    moved, = lm.loglikelihood([request("loglikelihood", context + " ", "Wasser")])
    assert moved[0] == pytest.approx(grouped[0][0], abs=1e-5)


def test_truncation_keeps_the_end_of_a_long_context(pipeline, lm):
    context = LONG_TEXT + "\nEnglish: water\nGerman:"
    long_request = request("loglikelihood", context, " Wasser", index=7)
    with pytest.raises(ValueError, match=r"request 0 \(task 'a_task', doc 7\).*truncation=True"):
        lm.loglikelihood([long_request])
    truncated = GLMKitLM(pipeline, truncation=True, progress=False)
    value, _ = truncated.loglikelihood([long_request])[0]
    ids = pipeline.tokenizer.encode(context)
    continuation = pipeline.tokenizer.encode("Wasser")
    kept = ids[len(ids) - (pipeline.model.config.max_sequence_length - 1 - len(continuation)):]
    assert value == pytest.approx(pipeline.score(Tokens(kept), "Wasser").logprob, abs=1e-4)
    out, = truncated.generate_until([request("generate_until", context, {"until": ["\n"], "max_gen_toks": 4})])
    assert isinstance(out, str) and "\n" not in out


@pytest.mark.parametrize("kwargs, match", [
    ({}, "a backend .* or pretrained"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"max_gen_toks": "many"}, "max_gen_toks must be a positive integer"),
    ({"unidirectional": True}, "unidirectional=True needs use_task_mask=True"),
    ({"truncation": "maybe"}, "truncation must be True or False"),
    ({"device": "cpu"}, "device and dtype apply to pretrained"),
])
def test_bad_model_arguments_are_named(pipeline, kwargs, match):
    backend = None if not kwargs else pipeline
    with pytest.raises(ValueError, match=match):
        GLMKitLM(backend, **kwargs)


@pytest.mark.parametrize("kind, args, match", [
    ("loglikelihood", ("a [MASK] b [MASK]", "x"), "request 0 .*holds 2 masks"),
    ("loglikelihood", ("a [mask] b", "x"), "request 0 .*malformed mask"),
    ("loglikelihood", ("a", ""), "request 0 .*no tokens to score"),
    ("loglikelihood", ("a", 3), "request 0 .*\\(context, continuation\\) strings"),
    ("loglikelihood", ("a\ud800", "x"), "request 0 .*the context.*surrogate"),
    ("loglikelihood_rolling", (5,), "request 0 .*\\(text,\\)"),
    ("generate_until", ("a", {"until": [""]}), "request 0 .*until must be"),
    ("generate_until", ("a", {"max_gen_toks": 0}), "request 0 .*max_gen_toks must be"),
    ("generate_until", ("a", {"temprature": 0.5}), "request 0 .*unknown generation arguments"),
    ("generate_until", ("a", {"max_gen_toks": 2, "max_new_tokens": 2}), "request 0 .*keep one"),
])
def test_bad_requests_fail_before_the_model_runs_naming_the_request(lm, kind, args, match):
    valid = {"loglikelihood": ("a", " b"), "loglikelihood_rolling": ("a",), "generate_until": ("a", {})}[kind]
    with pytest.raises((ValueError, TypeError), match=match.replace("request 0", "request 1")):
        getattr(lm, kind)([request(kind, *valid), request(kind, *args, index=1)])


def test_on_the_shipped_task_glmkits_evaluator_and_lm_eval_pick_the_same_choices(pipeline, lm, at_root):
    """Issue 15's acceptance: stdlib-mc through glmkit.evaluation and glmkit_stdlib_mc (the same jsonl as an
    lm-eval task) through lm-eval and GLMKitLM give every example the same choice, hence the same accuracy."""
    ours = evaluate(pipeline, "stdlib-mc", progress=False)
    manager = TaskManager(include_path=str(ROOT / "configs" / "tasks" / "lm-eval"), include_defaults=False)
    theirs = run_lm_eval(lm, manager, ["glmkit_stdlib_mc"])
    samples = theirs["samples"]["glmkit_stdlib_mc"]
    rows = ours.rows.set_index("example")
    assert len(samples) == len(rows) == 210
    for sample in samples:
        row = rows.loc[sample["doc"]["id"]]
        lls = [r[0] for r in sample["filtered_resps"]]
        assert max(range(len(lls)), key=lls.__getitem__) == row["choices"].index(row["prediction"])
        assert lls == pytest.approx(row["logprobs"], abs=1e-4)
    assert theirs["results"]["glmkit_stdlib_mc"]["acc,none"] == pytest.approx(ours.summary["accuracy"] @
                                                                              ours.summary["n"] / 210)
    assert ours.rows["correct"].mean() > (1 / ours.rows["choices"].map(len)).mean() + 0.2  # well above chance


def test_on_the_shipped_generation_task_both_give_the_same_answers(pipeline, lm, at_root):
    """stdlib-completion's first 4 examples of each group: glmkit.evaluation's answer (the filled blank, cut at
    the newline) and lm-eval's (generate_until, then its strip filter) are the same text."""
    ours = evaluate(pipeline, "stdlib-completion", progress=False, limit=4).rows.set_index("example")
    starts = [0, 34, 67]  # where import_name, loop_variable and self_assign begin in the YAML's data files
    manager = TaskManager(include_path=str(ROOT / "configs" / "tasks" / "lm-eval"), include_defaults=False)
    docs = [start + i for start in starts for i in range(4)]
    theirs = run_lm_eval(lm, manager, ["glmkit_stdlib_completion"], samples={"glmkit_stdlib_completion": docs})
    samples = theirs["samples"]["glmkit_stdlib_completion"]
    assert sorted(s["doc"]["id"] for s in samples) == sorted(ours.index)
    for sample in samples:
        assert sample["filtered_resps"][0] == ours.loc[sample["doc"]["id"], "prediction"]
    assert theirs["results"]["glmkit_stdlib_completion"]["exact_match,strip"] == pytest.approx(ours["exact"].mean())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_lm_eval_and_glmkits_evaluator_agree(demo_config, at_root):
    """The same comparison in fp16 on a GPU (CUDA graphs and fused kernels in generate_until): batches differ
    between the two paths, so a near tie may fall the other way, but hardly ever."""
    from glmkit.generate.pipeline import GLMPipeline

    gpu = GLMPipeline.from_config(demo_config.replace(device="cuda", dtype="fp16"))
    ours = evaluate(gpu, "stdlib-mc", progress=False).rows.set_index("example")
    manager = TaskManager(include_path=str(ROOT / "configs" / "tasks" / "lm-eval"), include_defaults=False)
    samples = run_lm_eval(GLMKitLM(gpu, progress=False), manager, ["glmkit_stdlib_mc"])["samples"]["glmkit_stdlib_mc"]
    same = 0
    for sample in samples:
        lls = [r[0] for r in sample["filtered_resps"]]
        row = ours.loc[sample["doc"]["id"]]
        same += row["choices"][lls.index(max(lls))] == row["prediction"]
    assert same >= 0.98 * len(samples)
    out, = GLMKitLM(gpu, progress=False).generate_until([request("generate_until", "def f(x):\n", {"until": ["\n"]})])
    assert "\n" not in out


# ----- fuzz -----------------------------------------------------------------------------------------------

_ALPHABET = list("abcxyz ():=.,_\n\t") + ["  ", "é", "中", "\U0001f600", "[MASK]", "[gMASK]", "[sMASK]", "[mask]"]


def _text(rng: random.Random, longest: int = 10) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, longest)))


def test_fuzzed_loglikelihood_requests_give_scores_or_name_the_request(lm):
    """Seeded random (context, continuation) batches: every call returns log-probabilities <= 0 for each
    request, or raises ValueError/TypeError naming a request; a request's result in the batch equals its result
    alone."""
    rng = random.Random(20261206)
    for _ in range(30):
        requests = [request("loglikelihood", _text(rng), _text(rng, 4), index=i) for i in range(rng.randint(1, 4))]
        try:
            results = lm.loglikelihood(requests)
        except (ValueError, TypeError) as error:
            assert str(error).startswith("request "), error
            continue
        for value, greedy in results:
            assert math.isfinite(value) and value <= 0 and isinstance(greedy, bool)
        alone = rng.randrange(len(requests))  # one of them scored on its own gives the same number
        assert lm.loglikelihood([requests[alone]])[0][0] == pytest.approx(results[alone][0], abs=1e-4)


def test_fuzzed_generate_until_requests_give_text_or_name_the_request(lm):
    rng = random.Random(20261207)
    options = {"until": [["\n"], "x", [], None, [""], 3], "max_gen_toks": [1, 2, 0, "2"],
               "do_sample": [False, True, "no"], "temperature": [0.0, 0.7, -1.0], "top_k": [0, 5, 1.5],
               "seed": [1, None], "temprature": [1.0]}
    for _ in range(40):
        kwargs = {k: rng.choice(v) for k, v in options.items() if rng.random() < 0.4}
        kwargs.setdefault("max_gen_toks", 2)
        requests = [request("generate_until", _text(rng), dict(kwargs), index=i) for i in range(rng.randint(1, 3))]
        try:
            outputs = lm.generate_until(requests)
        except (ValueError, TypeError) as error:
            assert str(error).startswith("request "), error
            continue
        until = kwargs.get("until") or []
        for out in outputs:
            assert isinstance(out, str)
            assert not any(u in out for u in ([until] if isinstance(until, str) else until))


# ----- through a cluster ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    with GLMCluster(config="glm-tiny", n=2, nccl_env={"NCCL_DEBUG": "WARN"}) as running:
        yield running
    assert running._client is None


def test_a_two_engine_cluster_gives_the_pipelines_loglikelihoods(pipeline, lm, cluster):
    requests = [request("loglikelihood", c, x, index=i) for i, (c, x) in enumerate([
        ("English: house\nGerman:", " Haus"), ("English: house\nGerman:", " Baum"), ("", "import os"),
        ("for [MASK] in range(3):", "i"), ("def f(x):\n    return", " x")])]
    on_cluster = GLMKitLM(cluster, progress=False)
    got, want = on_cluster.loglikelihood(requests), lm.loglikelihood(requests)
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-5)
    assert [g[1] for g in got] == [w[1] for w in want]
    rolled = on_cluster.loglikelihood_rolling([request("loglikelihood_rolling", LONG_TEXT[:1500])])
    assert rolled == pytest.approx(lm.loglikelihood_rolling([request("loglikelihood_rolling", LONG_TEXT[:1500])]),
                                   abs=1e-4)
