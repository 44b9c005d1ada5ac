"""The shipped demo model is trained, not random: held-out perplexity far below a unigram's, it writes Python,
and with notebook 03's few-shot prompt it answers in German words that end at the stop sequence."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from glmkit.tokenizer import NUM_IMAGE_TOKENS
from glmkit.widgets.templates import load_template
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
    module = result.blanks[0].text.strip().split("\n")[0]
    assert module in sys.stdlib_module_names, result.blanks[0].text  # "threading" from the shipped model
    result = pipeline.generate("def [MASK](self, other):\n    return self.value + other.value", max_new_tokens=12)
    name = result.blanks[0].text.strip()
    assert name.isidentifier(), name


def _scored_translation() -> dict:
    return json.loads((ROOT / "docs" / "demo-model" / "training_log.json").read_text())["result"]["translation"]


def test_few_shot_translation_of_words_seen_paired(pipeline):
    # FreeDict pairs the model was trained on (the stdlib-only model answered "Käse" and URLs here).
    table = load_template("en-de-translation").run(pipeline, ["house", "water", "tree", "mother", "dog"],
                                                   max_new_tokens=8)
    assert list(table["answer"]) == ["Haus", "Wasser", "Baum", "Mutter", "Hund"]
    assert set(table["finish_reason"]) == {"stop"}


def test_most_training_words_the_prompt_does_not_show_translate(pipeline):
    # An evenly spaced sample of the training dictionary (none of the prompt's own examples), as notebook 03's
    # first table shows it: the model answers most with the dictionary's German.
    sample = _scored_translation()["memory"]["rows"][::15]
    table = load_template("en-de-translation").run(pipeline, [row["english"] for row in sample], max_new_tokens=8)
    correct = [answer == row["german"] for answer, row in zip(table["answer"], sample)]
    assert sum(correct) >= 0.75 * len(sample), list(zip(table["answer"], [row["german"] for row in sample]))


def test_held_out_words_get_one_german_word_cut_by_the_stop(pipeline):
    # Words never paired in training (docs/demo-model/training_log.json): mostly wrong, but answers in the
    # pattern, words of letters, and without the stop the model goes on with the next invented example.
    words = ["according", "acid", "addition", "amount", "financial"]
    template = load_template("en-de-translation")
    table = template.run(pipeline, words, max_new_tokens=8)
    assert all(answer.replace(" ", "").isalpha() for answer in table["answer"]), list(table["answer"])
    assert set(table["finish_reason"]) == {"stop"}
    runaway = pipeline.generate(template.build_prompt("according"), max_new_tokens=12)
    assert "\nEnglish:" in runaway.completion and runaway.finish_reason == "length"
