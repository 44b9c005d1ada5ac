"""The training objective builds exactly the layout inference runs; loss, baseline and seeding behave."""
from __future__ import annotations

import math

import pytest
import torch

import glmkit.generate.blanks as infilling
from glmkit.config import GLMConfig
from glmkit.generate.tokens import Context, TokenOutput, next_positions, prefill_inputs
from glmkit.model import GLM, KVCache
from glmkit.generate.sampling import GenerationSettings
from glmkit.tokenizer import DEMO_TOKENIZER_DIR, GLMTokenizer
from glmkit.lab.objective import (IGNORE, BatchStream, Corpus, ObjectiveSettings, Sample, blank_sample, encode_blank,
                              gmask_sample, make_batch, pack_rows, sample_layout)
from glmkit.lab.training import TrainSettings, init_weights, perplexity, train, unigram_log_probs

CODE = '''def add(self, other):
    """Return the sum of two values."""
    return self.value + other.value


class Counter:
    def __init__(self):
        self.count = 0

    def increment(self, step=1):
        # Count up by one step.
        self.count += step
        return self.count
'''


@pytest.fixture(scope="module")
def tok():
    return GLMTokenizer.load(DEMO_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def corpus(tok):
    texts = (CODE, CODE.replace("Counter", "Tally").replace("count", "total"),
             "The quick brown fox jumps over the lazy dog. It was not amused.\n" * 3)
    return Corpus(texts, tuple(len(t) / len(tok.encode(t)) for t in texts))


def tiny_model(vocab: int, seed: int = 0) -> GLM:
    model = GLM(GLMConfig(num_layers=2, hidden_size=32, num_attention_heads=4, inner_hidden_size=48,
                          vocab_size=vocab, max_sequence_length=128))
    init_weights(model, seed)
    return model


def spans_of(text: str, *words: str) -> list[tuple[int, int]]:
    return [(text.index(w), text.index(w) + len(w)) for w in words]


def test_mask_sample_is_the_inference_context(tok):
    sample = blank_sample(tok, CODE, spans_of(CODE, "add"), "[MASK]", 0, 512)
    prompt = CODE.replace("add", "[MASK]", 1)
    plan = infilling.plan_prompt(tok, prompt, 512)
    assert sample.context.tokens == plan.tokens + (tok.sop_id,)
    assert plan.tokens[-1] == tok.eos_id  # the text does not end with the mask
    assert sample.context.pinned_position == plan.tokens.index(tok.mask_id)
    assert sample.targets == tuple(tok.encode("add")) + (tok.eop_id,)

    ids, positions, allowed, labels = sample_layout(sample)
    n = len(sample.context.tokens)
    ref_ids, ref_positions, ref_allowed, _ = prefill_inputs([sample.context], "cpu")
    assert torch.equal(ids[:n], ref_ids[0]) and torch.equal(positions[:n], ref_positions[0])
    assert torch.equal(allowed[:n, :n], ref_allowed[0, 0])
    assert not allowed[:n - 1, n - 1:].any()  # the context never sees sop or generated tokens
    for k in range(1, len(sample.targets)):  # fed-back tokens: pinned positions, causal over everything
        assert positions[n - 1 + k] == next_positions([sample.context], k)[0] == sample.context.pinned_position
        assert allowed[n - 1 + k, :n + k].all() and not allowed[n - 1 + k, n + k:].any()
    assert ids[n:].tolist() == list(sample.targets[:-1])
    assert labels[n - 1:].tolist() == list(sample.targets) and (labels[:n - 1] == IGNORE).all()


def test_gmask_sample_is_the_inference_context(tok):
    prompt, rest = CODE[:40], CODE[40:]
    sample = gmask_sample(tok, prompt, rest, ends_document=True, sequence_length=512)
    plan = infilling.plan_prompt(tok, prompt, 512)
    assert plan.tokens[-1] == tok.gmask_id and sample.context.tokens == plan.tokens + (tok.sop_id,)
    assert sample.context.pinned_position is None
    assert sample.targets[-1] == tok.eop_id  # the document ends here
    ids, positions, allowed, labels = sample_layout(sample)
    n = len(sample.context.tokens)
    _, ref_positions, ref_allowed, _ = prefill_inputs([sample.context], "cpu")
    assert torch.equal(allowed[:n, :n], ref_allowed[0, 0])
    assert positions.tolist() == list(range(len(ids)))  # [gMASK] positions count on after sop
    assert torch.equal(positions[:n], ref_positions[0])
    # Truncated to the row: no eop, since the continuation did not end.
    short = gmask_sample(tok, prompt, rest, ends_document=True, sequence_length=len(plan.tokens) + 5)
    assert len(short.targets) == 5 and tok.eop_id not in short.targets
    assert sample_layout(short)[0].shape[0] == len(plan.tokens) + 5


def test_training_logits_equal_kv_cached_decoding(small_model):
    """The whole point: one training forward gives the logits inference computes step by step."""
    samples = [Sample(Context((5, 17, 2, 90, 40), 1), (7, 8, 9, 41)), Sample(Context((9, 33, 3, 40), None), (11, 12))]
    batch = pack_rows([samples], 32, eop_id=41)
    logits = small_model(batch.input_ids, batch.position_ids, batch.allowed)[0]
    at = 0
    for sample in samples:
        ids, positions, allowed, _ = prefill_inputs([sample.context], "cpu")
        n = ids.shape[1]
        cache = KVCache.allocate(small_model, 1, n + len(sample.targets))
        steps = [small_model(ids, positions, allowed, cache, torch.arange(n))[0, -1]]
        for k, token in enumerate(sample.targets[:-1], start=1):
            step_positions = next_positions([sample.context], k)[:, None]
            step_allowed = torch.ones(1, 1, 1, n + k, dtype=torch.bool)
            slot = torch.tensor([n + k - 1])
            steps.append(small_model(torch.tensor([[token]]), step_positions, step_allowed, cache, slot)[0, -1])
        trained = logits[at + n - 1: at + n - 1 + len(sample.targets)]
        torch.testing.assert_close(trained, torch.stack(steps), atol=1e-4, rtol=1e-4)
        at += sample.num_inputs


def test_several_blanks_follow_fill_blanks_round_by_round(tok, monkeypatch):
    """fill_blanks, given the right fills, builds exactly the contexts the training samples use."""
    blanks = spans_of(CODE, "add", "value", "self.count = 0")
    text, mask = CODE, "[MASK]"
    for start, end in reversed(blanks):
        text = text[:start] + mask + text[end:]
    samples = [blank_sample(tok, CODE, blanks, mask, r, 512) for r in range(len(blanks))]
    seen = []

    class FakeGenerator:
        def generate(self, contexts, settings, end_tokens, **kwargs):
            seen.append(contexts[0])
            return [TokenOutput(tokens=list(samples[len(seen) - 1].targets[:-1]), finish_reason="end")]

    plans = (infilling.plan_prompt(tok, text, 512),)
    result = infilling.fill_blanks(FakeGenerator(), tok, plans, GenerationSettings())[0]
    assert seen == [s.context for s in samples]
    assert result.text == CODE  # the targets decode back to the blanked text, spaces included


@pytest.mark.parametrize("before, text", [("def ", "add"), ("self.", "value"), ("x", " = 1"), ("", "import os"),
                                          ("a\n", "    b"), ("return", "\n    pass"), ("é", "ß ok")])
def test_blank_targets_decode_back(tok, before, text):
    tokens = encode_blank(tok, text, before)
    assert infilling._BlankDecoder(tok, before, ()).text(tokens) == text


def test_batches_shift_targets_and_pack_blocks(tok, corpus):
    batch = make_batch(corpus, tok, ObjectiveSettings(sequence_length=128, blank_window=(8, 40)), 6, 0, 0)
    b, s = batch.input_ids.shape
    assert (b, s) == (6, 128) and batch.allowed.shape == (6, 1, 128, 128)
    targets = batch.labels != IGNORE
    # Each target but a sample's last is the next input token (generated tokens are fed back).
    fed = targets[:, :-1] & targets[:, 1:]
    assert fed.any() and torch.equal(batch.labels[:, :-1][fed], batch.input_ids[:, 1:][fed])
    assert torch.equal(batch.scored, targets & (batch.labels != tok.eop_id))
    assert batch.num_tokens <= b * s and (batch.input_ids == tok.sop_id).sum() >= b
    assert batch.allowed.any(dim=-1).all()  # no empty attention row, padding included


def test_loss_drops_on_a_tiny_corpus(tok, corpus):
    torch.manual_seed(0)
    model = tiny_model(tok.padded_vocab_size())
    objective = ObjectiveSettings(sequence_length=96, blank_window=(8, 40))
    stream = iter(BatchStream(corpus, DEMO_TOKENIZER_DIR, objective, rows=2, seed=0))
    settings = TrainSettings(learning_rate=3e-3, min_learning_rate=3e-4, warmup_steps=3, steps=30, log_every=5)
    log = train(model, stream, settings, "cpu")
    losses = [r["train_loss"] for r in log if "train_loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0] - 1.0


def test_unigram_baseline_by_hand():
    # counts a=3, b=1 over a support of 4 ids: p = 4/8, 2/8, 1/8, 1/8 -> ppl of [a, b, c] is (1/64)^(-1/3) = 4.
    log_probs = unigram_log_probs({10: 3, 11: 1}, range(10, 14))
    assert math.isclose(perplexity(log_probs, [10, 11, 12]), 4.0)
    assert math.isclose(float(log_probs[10:14].exp().sum()), 1.0) and log_probs[9] == float("-inf")
    with pytest.raises(ValueError):
        unigram_log_probs({9: 1}, range(10, 14))


def test_seeded_runs_repeat(tok, corpus):
    objective = ObjectiveSettings(sequence_length=128, blank_window=(8, 40))
    a, b, c = (make_batch(corpus, tok, objective, 4, seed, index) for seed, index in ((1, 3), (1, 3), (1, 4)))
    for name in ("input_ids", "position_ids", "allowed", "labels"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.input_ids, c.input_ids)
    stream = iter(BatchStream(corpus, DEMO_TOKENIZER_DIR, objective, rows=4, seed=1, start=3))
    assert torch.equal(next(stream).input_ids, a.input_ids) and torch.equal(next(stream).input_ids, c.input_ids)

    def run() -> list[float]:
        model = tiny_model(tok.padded_vocab_size(), seed=5)
        batches = iter(BatchStream(corpus, DEMO_TOKENIZER_DIR, objective, rows=2, seed=1))
        settings = TrainSettings(warmup_steps=2, steps=4, log_every=1)
        return [r["train_loss"] for r in train(model, batches, settings, "cpu")]

    assert run() == run()
