"""The shipped demo model is trained, not random: held-out perplexity far below a unigram's, and it writes Python."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from glmkit.tokenizer import NUM_IMAGE_TOKENS
from glmkit.lab.objective import Corpus, heldout_lm_samples, pack_rows
from glmkit.lab.training import evaluate, perplexity, scored_tokens, unigram_log_probs

ROOT = Path(__file__).resolve().parent.parent
# Two standard-library files that were held out of the demo model's training corpus
# (docs/demo-model/training_log.json lists all 60 held-out files).
HELDOUT = [ROOT / "tests" / "data" / "heldout_xml_dom_pulldom.py.txt",
           ROOT / "tests" / "data" / "heldout_curses_ascii.py.txt"]


@pytest.fixture(scope="module")
def heldout_batches(pipeline):
    texts = tuple(path.read_text() for path in HELDOUT)
    tokenizer = pipeline.tokenizer
    corpus = Corpus(texts, tuple(len(t) / len(tokenizer.encode(t)) for t in texts))
    samples = heldout_lm_samples(corpus, tokenizer, pipeline.model.config.max_sequence_length)
    return [pack_rows([[s] for s in samples[i:i + 8]], pipeline.model.config.max_sequence_length,
                      tokenizer.eop_id) for i in range(0, len(samples), 8)]


def test_heldout_perplexity_is_below_a_third_of_the_unigram(pipeline, heldout_batches):
    counts = json.loads((ROOT / "docs" / "demo-model" / "unigram_counts.json").read_text())["counts"]
    unigram = unigram_log_probs({int(k): v for k, v in counts.items()},
                                range(NUM_IMAGE_TOKENS, pipeline.tokenizer.num_tokens))
    unigram_ppl = perplexity(unigram, scored_tokens(heldout_batches))
    model_ppl = evaluate(pipeline.model, heldout_batches, "cpu").perplexity
    assert unigram_ppl > 100  # sanity: the baseline is the weak model it should be
    assert model_ppl <= unigram_ppl / 3, (model_ppl, unigram_ppl)


def test_mask_infilling_writes_python(pipeline):
    result = pipeline.generate("import os\nimport [MASK]\n\n\ndef main():\n    args = sys.argv[1:]", max_new_tokens=8)
    assert result.blanks[0].text.strip() == "sys"
    result = pipeline.generate("def [MASK](self, other):\n    return self.value + other.value", max_new_tokens=12)
    name = result.blanks[0].text.strip()
    assert name.isidentifier(), name
