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
