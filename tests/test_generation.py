"""Token-level generation: greedy, sampling, seeds, penalties, logprobs, batches and beam search."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from glmkit.generate.beams import beam_search
from glmkit.generate.tokens import Context, Generator, generate_tokens, prefill_inputs
from glmkit.generate.budget import kv_cache_bytes
from glmkit.generate.sampling import (GenerationSettings, apply_penalties, filter_top_k_top_p,
                             repeated_ngram_bans, sampling_probabilities)
from glmkit.model import KVCache

CONTEXTS = [Context((5, 17, 2, 90, 40), None), Context((9, 33, 40), 1), Context((70, 71, 72, 73, 74, 40), None)]


def greedy_by_full_forward(model, context: Context, steps: int) -> list[int]:
    """Greedy decoding that recomputes the whole sequence every step (no cache, no batching)."""
    out = []
    for _ in range(steps):
        tokens = context.tokens + tuple(out)
        # The GLM layout by hand: context before sop bidirectional, then causal, pinned positions.
        n = len(context.tokens)
        ids = torch.tensor([tokens])
        allowed = torch.ones(1, 1, len(tokens), len(tokens), dtype=torch.bool).tril()
        allowed[..., : n - 1] = True
        pos = torch.arange(len(tokens))
        if context.pinned_position is not None:
            pos[n - 1:] = context.pinned_position
        logits = model(ids, pos[None], allowed)
        out.append(int(logits[0, -1].argmax()))
    return out


def test_greedy_with_cache_and_batch_matches_full_recompute(small_model):
    settings = GenerationSettings(max_new_tokens=6)
    batch = generate_tokens(small_model, CONTEXTS, settings, end_tokens=())
    for context, output in zip(CONTEXTS, batch):
        assert output.tokens == greedy_by_full_forward(small_model, context, 6)
        assert output.finish_reason == "length"


def test_end_tokens_and_min_new_tokens(small_model):
    first = generate_tokens(small_model, CONTEXTS[:1], GenerationSettings(max_new_tokens=6), end_tokens=())[0]
    k = next(i for i in range(1, 6) if first.tokens[i] not in first.tokens[:i])
    end = first.tokens[k]  # make a later greedy token, not seen before it, an end token
    stopped = generate_tokens(small_model, CONTEXTS[:1], GenerationSettings(max_new_tokens=6), (end,))[0]
    assert stopped.tokens == first.tokens[:k] and stopped.finish_reason == "end"
    forced = generate_tokens(small_model, CONTEXTS[:1], GenerationSettings(max_new_tokens=6, min_new_tokens=4),
                             (end,))[0]
    assert len(forced.tokens) >= 4 and end not in forced.tokens[:4]


def test_seeded_sampling_is_reproducible(small_model):
    settings = GenerationSettings(max_new_tokens=12, do_sample=True, temperature=1.5, seed=7)
    a = generate_tokens(small_model, CONTEXTS, settings, ())
    b = generate_tokens(small_model, CONTEXTS, settings, ())
    c = generate_tokens(small_model, CONTEXTS, GenerationSettings(max_new_tokens=12, do_sample=True,
                                                                  temperature=1.5, seed=8), ())
    assert [o.tokens for o in a] == [o.tokens for o in b]
    assert [o.tokens for o in a] != [o.tokens for o in c]


def test_top_k_one_and_tiny_top_p_reduce_to_greedy(small_model):
    greedy = [o.tokens for o in generate_tokens(small_model, CONTEXTS, GenerationSettings(max_new_tokens=5), ())]
    for extra in ({"top_k": 1}, {"top_p": 1e-6}):
        settings = GenerationSettings(max_new_tokens=5, do_sample=True, seed=3, **extra)
        assert [o.tokens for o in generate_tokens(small_model, CONTEXTS, settings, ())] == greedy


def test_filter_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_top_k_top_p(logits, top_k=0, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_top_k_top_p(logits, top_k=3, top_p=1.0))
    assert kept.tolist() == [[True, True, True, False]]


def test_penalties():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    settings = GenerationSettings(repetition_penalty=2.0)
    out = apply_penalties(logits, [[0, 1]], [[]], settings)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    settings = GenerationSettings(frequency_penalty=0.5, presence_penalty=1.0)
    out = apply_penalties(logits, [[3, 3, 2]], [[3, 3, 2]], settings)
    assert out.tolist() == [[2.0, -1.0, -1.0, 1.0]]


def test_repeated_ngram_bans():
    assert repeated_ngram_bans([1, 2, 3, 1, 2], 3) == [3]
    assert sorted(repeated_ngram_bans([4, 1, 4, 2, 4], 2)) == [1, 2]
    assert repeated_ngram_bans([1, 2], 3) == []


def test_no_repeat_ngram_generation(small_model):
    settings = GenerationSettings(max_new_tokens=20, no_repeat_ngram_size=2)
    for context, output in zip(CONTEXTS, generate_tokens(small_model, CONTEXTS, settings, ())):
        seq = list(context.tokens) + output.tokens
        bigrams = list(zip(seq, seq[1:]))
        generated = bigrams[len(context.tokens) - 1:]
        assert all(bigrams.count(b) == 1 for b in generated)


def test_logprobs_are_the_model_distribution(small_model):
    settings = GenerationSettings(max_new_tokens=3, top_logprobs=4)
    output = generate_tokens(small_model, CONTEXTS[:1], settings, ())[0]
    ids, positions, allowed, _ = prefill_inputs(CONTEXTS[:1], "cpu")
    first = small_model(ids, positions, allowed)[0, -1].log_softmax(-1)
    record = output.logprobs[0]
    assert record.token == output.tokens[0] == int(first.argmax())
    assert math.isclose(record.logprob, float(first.max()), abs_tol=1e-5)
    assert [t for t, _ in record.top] == first.topk(4).indices.tolist()
    assert len(output.logprobs) == len(output.tokens) == 3


def test_stop_callback_and_streaming(small_model):
    seen = []
    settings = GenerationSettings(max_new_tokens=10)
    outputs = generate_tokens(small_model, CONTEXTS, settings, (), stop=lambda i, toks: i == 1 and len(toks) == 3,
                              on_token=lambda i, tok, rec: seen.append((i, tok)))
    assert outputs[1].finish_reason == "stop" and len(outputs[1].tokens) == 3
    for i, output in enumerate(outputs):
        assert [t for j, t in seen if j == i] == output.tokens


def test_abort_stops_every_sequence(small_model):
    calls = iter(range(100))
    outputs = generate_tokens(small_model, CONTEXTS, GenerationSettings(max_new_tokens=30), (),
                              should_abort=lambda: next(calls) >= 2)
    assert all(o.finish_reason == "abort" and len(o.tokens) == 3 for o in outputs)


def _exhaustive_best(model, context, vocab, end_tokens, depth, length_penalty):
    """Score every sequence up to `depth` tokens (ending early at an end token) by brute force."""
    best = (-math.inf, None)
    for length in range(1, depth + 1):
        for seq in itertools.product(range(vocab), repeat=length):
            if any(t in end_tokens for t in seq[:-1]):
                continue
            ended = seq[-1] in end_tokens
            if not ended and length < depth:
                continue
            total = 0.0
            for i, token in enumerate(seq):
                tokens = context.tokens + seq[:i]
                n = len(context.tokens)
                ids = torch.tensor([tokens])
                allowed = torch.ones(1, 1, len(tokens), len(tokens), dtype=torch.bool).tril()
                allowed[..., : n - 1] = True
                logits = model(ids, torch.arange(len(tokens))[None], allowed)[0, -1]
                total += float(logits.log_softmax(-1)[token])
            generated = seq[:-1] if ended else seq
            score = total / (len(seq) ** length_penalty)
            if score > best[0]:
                best = (score, list(generated))
    return best[1]


def test_beam_search_finds_the_exhaustive_optimum():
    from glmkit.config import GLMConfig
    from glmkit.model import GLM

    config = GLMConfig(num_layers=1, hidden_size=16, num_attention_heads=2, inner_hidden_size=16, vocab_size=5)
    torch.manual_seed(3)
    model = GLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.8)
    context = Context((1, 2, 3), None)
    for length_penalty in (0.0, 1.0):
        settings = GenerationSettings(max_new_tokens=3, num_beams=25, length_penalty=length_penalty)
        found = beam_search(Generator(model), context, settings, end_tokens=(4,)).tokens
        assert found == _exhaustive_best(model, context, 5, (4,), 3, length_penalty)


@pytest.mark.parametrize("bad", [
    {"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"num_beams": 0}, {"top_k": -1},
    {"max_new_tokens": 0}, {"min_new_tokens": 5, "max_new_tokens": 2}, {"repetition_penalty": 0},
    {"num_beams": 2, "do_sample": True}, {"stop": [""]}, {"temperature": float("nan")}, {"top_logprobs": 50},
    # Issue 13: values that passed validation and then crashed inside torch or Python, or were taken silently.
    {"presence_penalty": -1e308}, {"frequency_penalty": 2.5}, {"length_penalty": 1e308},
    {"length_penalty": -11}, {"seed": 2**64}, {"do_sample": "no"}, {"logprobs": "no"},
    {"do_sample": 1}, {"stop": 5}, {"stop": {"e"}},
])
def test_invalid_settings_are_rejected_with_the_parameter_named(bad):
    with pytest.raises(ValueError) as error:
        GenerationSettings.from_kwargs(**bad)
    assert any(name in str(error.value) for name in bad)


def test_unknown_keyword_lists_known_ones():
    with pytest.raises(TypeError, match="max_length.*known"):
        GenerationSettings.from_kwargs(max_length=3)


def test_fixed_shape_decode_steps_generate_the_same_tokens(small_model):
    """The path CUDA graphs replay (fixed shapes, rows kept to the end), run eagerly on CPU."""
    generator = Generator(small_model)
    settings = GenerationSettings(max_new_tokens=7)
    full = [greedy_by_full_forward(small_model, context, 7) for context in CONTEXTS]  # recomputed from scratch
    # An end token that one row produces and another never does: one row ends early while others go on.
    end = (next(t for t in full[0][1:] + full[1][1:] + full[2][1:] if any(t not in f for f in full)),)
    expected = [tokens[:tokens.index(end[0])] if end[0] in tokens else tokens for tokens in full]
    assert any(len(e) < 7 for e in expected) and any(len(e) == 7 for e in expected)
    for _ in range(2):  # the second call reuses the step and its (dirty) cache
        got = generator.generate(CONTEXTS, settings, end)
        assert [o.tokens for o in got] == expected
    assert len(generator.steps.steps) == 1


def test_beam_search_stops_when_asked(small_model):
    calls = iter(range(100))
    settings = GenerationSettings(max_new_tokens=30, num_beams=3)
    output = generate_tokens(small_model, CONTEXTS[:1], settings, (), should_abort=lambda: next(calls) >= 2)[0]
    assert output.finish_reason == "abort" and len(output.tokens) == 3


def test_banned_ids_are_never_chosen_by_greedy_sampling_or_beam_search(small_model):
    favourites = generate_tokens(small_model, CONTEXTS, GenerationSettings(max_new_tokens=6), ())
    banned = sorted({t for o in favourites for t in o.tokens})  # every id greedy decoding chose
    for settings in (GenerationSettings(max_new_tokens=6),
                     GenerationSettings(max_new_tokens=6, do_sample=True, temperature=3.0, seed=1),
                     GenerationSettings(max_new_tokens=6, num_beams=3)):
        outputs = generate_tokens(small_model, CONTEXTS, settings, (), banned_ids=banned)
        assert all(len(o.tokens) == 6 and not set(o.tokens) & set(banned) for o in outputs), settings


EXTREME_VALID = [
    {"do_sample": True, "temperature": 1e-45}, {"do_sample": True, "temperature": 1e300},
    {"do_sample": True, "repetition_penalty": 1e-300}, {"do_sample": True, "repetition_penalty": 1e300},
    {"do_sample": True, "presence_penalty": -2.0, "frequency_penalty": -2.0},
    {"num_beams": 2, "repetition_penalty": 1e-300}, {"num_beams": 2, "repetition_penalty": 1e300},
    {"num_beams": 2, "length_penalty": 10.0}, {"num_beams": 2, "length_penalty": -10.0},
    {"do_sample": True, "seed": 2**64 - 1},
]


def test_extreme_valid_settings_still_generate(small_model):
    """Values inside the documented ranges must not crash (they used to: multinomial NaN for the tiny
    temperature and penalties, max() of nothing in beam search); the range ends must stay usable."""
    for extreme in EXTREME_VALID:
        settings = GenerationSettings(max_new_tokens=5, **{"seed": 0, **extreme})
        outputs = generate_tokens(small_model, CONTEXTS, settings, ())
        assert all(len(o.tokens) == 5 and all(0 <= t < 96 for t in o.tokens) for o in outputs), extreme


def test_tiny_temperature_samples_the_greedy_tokens_and_huge_is_uniform(small_model):
    greedy = [o.tokens for o in generate_tokens(small_model, CONTEXTS, GenerationSettings(max_new_tokens=6), ())]
    cold = GenerationSettings(max_new_tokens=6, do_sample=True, temperature=1e-45, seed=4)
    assert [o.tokens for o in generate_tokens(small_model, CONTEXTS, cold, ())] == greedy
    logits = torch.tensor([[3.0, -1.0, 0.5, -math.inf]])
    hot = sampling_probabilities(logits, GenerationSettings(do_sample=True, temperature=1e300))
    assert torch.allclose(hot, torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0]]))


def test_a_row_with_every_id_banned_ends_instead_of_crashing():
    """min_new_tokens bans the end token and no_repeat_ngram_size=1 every id already seen: on a 5-id
    vocabulary the only way out after one token is to end."""
    from glmkit.config import GLMConfig
    from glmkit.model import GLM

    torch.manual_seed(0)
    model = GLM(GLMConfig(num_layers=1, hidden_size=16, num_attention_heads=2, inner_hidden_size=16,
                          vocab_size=5)).eval()
    context = Context((1, 2, 3), None)  # leaves 0 as the one id neither seen nor the end token 4
    for extra in ({}, {"do_sample": True, "seed": 0}, {"num_beams": 2}):
        settings = GenerationSettings(max_new_tokens=4, min_new_tokens=3, no_repeat_ngram_size=1, **extra)
        output = generate_tokens(model, [context], settings, end_tokens=(4,))[0]
        assert output.tokens == [0] and output.finish_reason == "end", extra


def test_each_row_samples_from_its_own_seeded_stream(small_model):
    settings = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=2.0, seed=7)
    batch = generate_tokens(small_model, CONTEXTS, settings, ())
    for context, output in zip(CONTEXTS, batch):
        assert output.tokens == generate_tokens(small_model, [context], settings, ())[0].tokens
    later_blank = generate_tokens(small_model, CONTEXTS, settings, (), blank=1)
    assert [o.tokens for o in later_blank] != [o.tokens for o in batch]


def test_kv_cache_size_is_what_the_cache_allocates(small_model):
    cache = KVCache.allocate(small_model, 3, 17)
    assert kv_cache_bytes(small_model, 3, 17) == cache.keys.nbytes + cache.values.nbytes


def test_a_cache_larger_than_memory_is_refused_before_any_compute(small_model, time_limit):
    with time_limit(10), pytest.raises(ValueError, match=r"num_beams=1000000000 needs a KV cache .* at most \d+ rows"):
        beam_search(Generator(small_model), CONTEXTS[0], GenerationSettings(num_beams=10**9), end_tokens=())
