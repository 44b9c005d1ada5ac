"""Text-level blank filling on the shipped demo model: GLM-130B's prompt rules, stops, streams, batches."""
from __future__ import annotations

import pytest

from glmkit.generate.blanks import check_masks, plan_prompt


def test_prompt_rules_follow_glm130b_generate(tokenizer):
    plain = plan_prompt(tokenizer, "Hello world", 512)
    assert plain.tokens[-1] == tokenizer.gmask_id and plain.appended_gmask and plain.uses_gmask
    middle = plan_prompt(tokenizer, "A [MASK] B", 512)
    assert middle.tokens[-1] == tokenizer.eos_id and middle.mask_name == "[MASK]"
    assert middle.tokens.count(tokenizer.mask_id) == 1
    at_end = plan_prompt(tokenizer, "A [sMASK]", 512)
    assert at_end.tokens[-1] == tokenizer.smask_id and not at_end.appended_gmask
    explicit = plan_prompt(tokenizer, "Story: [gMASK]", 512)
    assert explicit.tokens[-1] == tokenizer.gmask_id and not explicit.appended_gmask


@pytest.mark.parametrize("prompt", ["a [mask] b", "a [MASK b", "[ MASK ] x", "x [xMASK] y", "[Mask]"])
def test_malformed_masks_are_rejected(prompt):
    with pytest.raises(ValueError, match="malformed mask"):
        check_masks(prompt)


def test_mixed_mask_kinds_are_rejected():
    with pytest.raises(ValueError, match="mixes mask kinds"):
        check_masks("a [MASK] b [gMASK]")


def test_plain_word_mask_is_fine():
    assert check_masks("wear a mask [MASK] please") == ["[MASK]"]


def test_prompt_longer_than_the_model_names_both_lengths(tokenizer):
    with pytest.raises(ValueError, match=r"prompt is \d+ tokens long.*at most 512"):
        plan_prompt(tokenizer, "word " * 600, 512)


def test_two_masks_are_filled_left_to_right_and_spliced(pipeline):
    result = pipeline.generate("def [MASK](x):\n    return [MASK]\n", max_new_tokens=4)
    assert len(result.blanks) == 2
    for blank in result.blanks:
        assert result.text[blank.start:blank.end] == blank.text
        assert len(blank.tokens) <= 4
    first, second = result.blanks
    assert result.text.startswith("def ") and result.text.endswith("\n")
    assert result.text[first.end:second.start] == "(x):\n    return "
    assert "[MASK]" not in result.text


def test_gmask_continuation_appends_to_the_prompt(pipeline):
    result = pipeline.generate("The quick brown fox", max_new_tokens=5)
    assert result.text.startswith("The quick brown fox")
    assert result.text[len("The quick brown fox"):] == result.blanks[0].text
    assert result.num_prompt_tokens == len(plan_prompt(pipeline.tokenizer, "The quick brown fox", 512).tokens) + 1


def test_batch_equals_one_by_one(pipeline):
    prompts = ["import [MASK]", "Hello", "x = [MASK] + 1 if y else [MASK]"]
    batch = pipeline.generate(prompts, max_new_tokens=6)
    for prompt, result in zip(prompts, batch):
        single = pipeline.generate(prompt, max_new_tokens=6)
        assert result.text == single.text and [b.tokens for b in result.blanks] == [b.tokens for b in single.blanks]


def test_stop_string_ends_text_before_it_and_stream_matches(pipeline):
    free = pipeline.generate("print(", max_new_tokens=24)
    text = free.blanks[0].text
    assert len(text) > 3, "the demo model should produce some text here"
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = text.index(stop)
    streamed = []
    stopped = pipeline.generate("print(", max_new_tokens=24, stop=[stop, "\u0000never"],
                                on_text=lambda event: streamed.append(event.text))
    assert stopped.blanks[0].text == text[:cut]
    assert stopped.finish_reason == "stop"
    assert "".join(streamed) == text[:cut]


def test_streamed_text_equals_the_blanks(pipeline):
    events = []
    result = pipeline.generate("a [MASK] b [MASK] c", max_new_tokens=5, on_text=events.append)
    for number, blank in enumerate(result.blanks):
        assert "".join(e.text for e in events if e.blank == number) == blank.text


def test_seeded_sampling_and_logprobs(pipeline):
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=0.9, top_p=0.95, seed=11, top_logprobs=3)
    a = pipeline.generate("Once upon", **kwargs)
    b = pipeline.generate("Once upon", **kwargs)
    assert a.text == b.text
    records = a.blanks[0].logprobs
    assert len(records) == len(a.blanks[0].tokens)
    assert all(len(r.top) == 3 and r.logprob <= 0 for r in records)


def test_beam_search_runs_through_the_text_layer(pipeline):
    result = pipeline.generate("import [MASK]", max_new_tokens=4, num_beams=3, no_repeat_ngram_size=2)
    assert result.blanks and len(result.blanks[0].tokens) <= 4


def test_empty_prompt_generates_from_gmask_alone(pipeline):
    result = pipeline.generate("", max_new_tokens=3)
    assert result.text == result.blanks[0].text


def test_abort_keeps_unfilled_masks_in_the_text(pipeline):
    calls = iter(range(100))
    # Checked once before each round and once per token: the third check falls inside the first blank.
    result = pipeline.generate("a [MASK] b [MASK] c", max_new_tokens=5, should_abort=lambda: next(calls) >= 2)
    assert len(result.blanks) == 1 and result.blanks[0].finish_reason == "abort"
    assert len(result.blanks[0].tokens) == 2
    assert result.text.endswith(" b [MASK] c")


def test_bad_inputs_fail_before_compute(pipeline):
    with pytest.raises(ValueError, match="temperature"):
        pipeline.generate("x", temperature=-1, do_sample=True)
    with pytest.raises(ValueError, match="no prompts"):
        pipeline.generate([])
    with pytest.raises(TypeError, match="must be a string"):
        pipeline.generate([3])


def test_sampling_never_picks_the_padding_rows_of_the_vocabulary(pipeline):
    """The embedding has 22400 rows for 22344 tokenizer ids; the extra rows are not tokens."""
    assert pipeline.model.config.vocab_size > pipeline.tokenizer.num_tokens
    for seed in range(3):
        result = pipeline.generate("x", max_new_tokens=40, do_sample=True, temperature=50.0, seed=seed)
        assert all(t < pipeline.tokenizer.num_tokens for b in result.blanks for t in b.tokens)


def _not_text(tokenizer) -> set[int]:
    # Written out here rather than taken from the tokenizer, so the test does not trust what it checks.
    special = set(tokenizer.special_ids.values()) - {tokenizer.eop_id}
    return special | set(range(20000))


def test_generated_masks_are_not_blanks_and_every_call_ends(pipeline, time_limit):
    """Issue 13's calls: a generated [MASK] used to open a new blank, so the first never returned and the
    second gave 6 blanks for 1 mask (GLM-130B's generate.py does the same; glmkit deliberately does not)."""
    with time_limit(30):
        looping = pipeline.generate("[MASK]", max_new_tokens=4, repetition_penalty=1e-300)
    with time_limit(30):
        hot = pipeline.generate("x = [MASK]", max_new_tokens=32, do_sample=True, temperature=5.0, seed=42)
    for result in (looping, hot):
        assert len(result.blanks) == 1 and not set(result.blanks[0].tokens) & _not_text(pipeline.tokenizer)
        assert result.text[result.blanks[0].start:result.blanks[0].end] == result.blanks[0].text


def test_no_strategy_generates_special_or_image_ids(pipeline, time_limit):
    not_text = _not_text(pipeline.tokenizer)
    # A penalty of 1e-300 makes every id already seen (the masks, eos, sop) the likeliest choice.
    for kwargs in ({}, {"do_sample": True, "temperature": 5.0, "seed": 3}, {"num_beams": 2}):
        with time_limit(30):
            result = pipeline.generate("a [MASK] b [MASK]", max_new_tokens=6, repetition_penalty=1e-300, **kwargs)
        assert len(result.blanks) == 2, kwargs
        assert not {t for b in result.blanks for t in b.tokens} & not_text, kwargs


def test_seeded_sampling_gives_each_prompt_the_same_text_alone_or_in_a_batch(pipeline):
    prompts = ["import [MASK]", "Hello", "x = [MASK] + 1 if y else [MASK]"]
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.0, seed=7)
    batch = pipeline.generate(prompts, **kwargs)
    for prompt, result in zip(prompts, batch):
        alone = pipeline.generate(prompt, **kwargs)
        assert result.text == alone.text and [b.tokens for b in result.blanks] == [b.tokens for b in alone.blanks]


def test_abort_before_a_blank_starts_reports_abort(pipeline):
    untouched = pipeline.generate("a [MASK] b", max_new_tokens=5, should_abort=lambda: True)
    assert untouched.blanks == [] and untouched.text == "a [MASK] b"
    assert untouched.finish_reason == "abort" and untouched.unfilled_blanks == 1
    # Checks: before blank 0, after each of its 2 tokens, then before blank 1, which is never started.
    calls = iter(range(100))
    half = pipeline.generate("a [MASK] b [MASK] c", max_new_tokens=2, should_abort=lambda: next(calls) >= 3)
    assert [b.finish_reason for b in half.blanks] == ["length"] and half.text.endswith(" b [MASK] c")
    assert half.finish_reason == "abort"


def test_a_request_that_cannot_fit_in_memory_fails_fast_naming_num_beams(pipeline, time_limit):
    with time_limit(10), pytest.raises(ValueError, match=r"num_beams=1000000 needs a KV cache of .* GiB"):
        pipeline.generate("x = [MASK]", num_beams=10**6, max_new_tokens=4)


BAD_CALLS = [
    (("x",), {"on_text": 5}, "on_text"), (("x",), {"should_abort": 5}, "should_abort"),
    (("x",), {"stop": 5}, "stop"), (("x",), {"stop": {"e"}}, "stop"), ((None,), {}, "prompts"),
    ((["ok", 3],), {}, r"prompts\[1\]"), (("ab\ud800",), {}, "prompt holds a lone surrogate .* at character 2"),
    (("x",), {"do_sample": "no"}, "do_sample"), (("x",), {"logprobs": "no"}, "logprobs"),
    (("x",), {"seed": 2**64, "do_sample": True}, "seed"), (("x",), {"presence_penalty": -1e308}, "presence_penalty"),
]


@pytest.mark.parametrize("args, kwargs, named", BAD_CALLS)
def test_bad_calls_name_the_parameter_before_any_compute(pipeline, monkeypatch, args, kwargs, named):
    def no_compute(*a, **k):
        raise AssertionError("generation started")

    monkeypatch.setattr(pipeline.generator, "generate", no_compute)
    with pytest.raises((TypeError, ValueError), match=named):
        pipeline.generate(*args, **kwargs)
