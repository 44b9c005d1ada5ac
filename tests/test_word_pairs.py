"""FreeDict word pairs for the demo model: dictd files read by hand, entries cleaned, held-out pairs kept out."""
from __future__ import annotations

import gzip

import pytest

from glmkit.lab.word_pairs import (DICTD_DIGITS, Entry, Pair, build_pairs, clean_phrase, dictd_number,
                                   example_phrases, format_pair, pair_documents, parse_entry, read_dictd,
                                   split_pairs)
from glmkit.widgets.templates import Example, load_template

# Three entries written as FreeDict's eng-deu has them (one headword with two senses).
ENTRIES = [
    'dog /dˈɒɡ/\nKlampe <fem>, Klemme <fem> [techn.]\n   Synonyms: {cleat}, {chock}\n\n',
    'dog /dˈɒɡ/\nHund <masc> [zool.]\n      "train a dog"  - einen Hund abrichten\n'
    '      "unleash the dogs"  - die Hunde loslassen\n see: {dogs}, {pet dog}\n\n',
    'Good night! /ɡˈʊd nˈaɪt/\nGute Nacht!\n',
]


def b64(n: int) -> str:
    digits = ""
    while True:
        digits, n = DICTD_DIGITS[n % 64] + digits, n // 64
        if not n:
            return digits


@pytest.fixture()
def dictd(tmp_path):
    """A handmade .index/.dict.dz pair; two index lines share the last entry, as headword variants do."""
    text = "".join(ENTRIES).encode("utf-8")
    offsets, at = [], 0
    for entry in ENTRIES:
        offsets.append((at, len(entry.encode("utf-8"))))
        at += offsets[-1][1]
    lines = [f"dog\t{b64(o)}\t{b64(n)}" for o, n in offsets[:2]]
    lines += [f"good night\t{b64(offsets[2][0])}\t{b64(offsets[2][1])}",
              f"Good night!\t{b64(offsets[2][0])}\t{b64(offsets[2][1])}"]
    (tmp_path / "t.index").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with gzip.open(tmp_path / "t.dict.dz", "wb") as f:
        f.write(text)
    return tmp_path / "t.index", tmp_path / "t.dict.dz"


def test_dictd_numbers():
    assert [dictd_number(s) for s in ("A", "B", "/", "BA", "B8")] == [0, 1, 63, 64, 124]
    assert dictd_number(b64(79_560_845)) == 79_560_845
    with pytest.raises(ValueError, match="'x!' is not a dictd number"):
        dictd_number("x!")


def test_read_dictd_returns_each_entry_once(dictd):
    assert read_dictd(*dictd) == ENTRIES


def test_read_dictd_names_the_bad_line(dictd, tmp_path):
    index, data = dictd
    index.write_text("dog\tA\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"t\.index:1: expected 'headword<TAB>offset<TAB>length'"):
        read_dictd(index, data)
    index.write_text("dog\tA\tBAAA\n", encoding="utf-8")
    with pytest.raises(ValueError, match="runs past the end"):
        read_dictd(index, data)


def test_parse_entry():
    first, second, third = map(parse_entry, ENTRIES)
    assert first == Entry("dog", ("Klampe <fem>", "Klemme <fem> [techn.]"), (), 2)
    assert second.headword == "dog" and second.translations == ("Hund <masc> [zool.]",)
    assert second.examples == (("train a dog", "einen Hund abrichten"), ("unleash the dogs", "die Hunde loslassen"))
    assert second.weight == 3 * 2 + 2  # examples count more than cross references
    assert third == Entry("Good night!", ("Gute Nacht!",), (), 0)
    assert parse_entry("lonely headword\n\n") is None


@pytest.mark.parametrize("text, expected", [
    ("Käse <masc> [cook.]", "Käse"), (" [Am.] Laufmasche <fem>", "Laufmasche"), ("House-Musik <fem>", "House-Musik"),
    ("Haus (Gebäude) <neut>", "Haus"), ("wunderschön  <adj>", "wunderschön"), ("it's", "it's"),
    ("auf etw. abfärben", None), ("Mehrjahres…", None), ("Formel 1", None), ("a b c", None), ("<pl>", None)])
def test_clean_phrase(text, expected):
    assert clean_phrase(text, max_words=2) == expected


def test_build_pairs_picks_the_common_sense():
    entries = [parse_entry(e) for e in ENTRIES]
    dog, night = build_pairs(entries)
    # "Hund" has the examples; every sense's translation is accepted; shared end punctuation is dropped.
    assert dog == Pair("dog", "Hund", ("Klampe", "Klemme", "Hund"), dog.commonness)
    assert (night.english, night.german, night.accepted) == ("Good night", "Gute Nacht", ("Gute Nacht",))
    # A German -> English dictionary that translates Klemme back to "dog" (and is common) wins over weights.
    reverse = {"Klemme": Pair("Klemme", "dog", ("dog", "clamp"), 50), "Hund": Pair("Hund", "dog", ("dog",), 10)}
    assert build_pairs(entries, reverse=reverse)[0].german == "Klemme"
    assert example_phrases(entries) == [("train a dog", "einen Hund abrichten"),
                                        ("unleash the dogs", "die Hunde loslassen")]


def test_split_keeps_heldout_words_out_of_training():
    words = ["water", "house", "tree", "cat", "dog", "book"]
    pairs = [Pair(w, w.upper(), (w.upper(),), 100 - i) for i, w in enumerate(words)]
    pairs += [Pair("water bottle", "Wasserflasche", ("Wasserflasche",), 1),
              Pair("houses", "Häuser", ("Häuser",), 1), Pair("tree house", "Baumhaus", ("Baumhaus",), 1)]
    phrases = [("a glass of water", "ein Glas Wasser"), ("a big house", "ein großes Haus")]
    train, heldout, kept = split_pairs(pairs, phrases, num_heldout=2, seed=0, pool=4)
    assert len(heldout) == 2 and {p.english for p in heldout} <= {"water", "house", "tree", "cat"}
    banned = {p.english for p in heldout}
    for english in [p.english for p in train] + [e for e, _ in kept]:
        forms = set(english.split()) | {w[:-1] for w in english.split() if w.endswith("s")}
        assert not forms & banned, english
    assert len(train) + len(heldout) + sum(p.english in ("water bottle", "houses", "tree house") for p in train) \
        >= 6  # only leaking pairs were dropped
    assert split_pairs(pairs, phrases, 2, seed=0, pool=4) == (train, heldout, kept)  # seeded
    with pytest.raises(ValueError, match="num_heldout=9"):
        split_pairs(pairs, phrases, 9, seed=0, pool=4)
    # Words the prompt's own examples show are never tested; training keeps the most common of each kind.
    _, heldout, _ = split_pairs(pairs, phrases, 4, seed=0, pool=4, reserved={"House", "cat"})
    assert {p.english for p in heldout} == {"water", "tree", "dog", "book"}
    train, _, _ = split_pairs(pairs, [], 1, seed=0, pool=1, max_words=2, max_multi=1)
    assert [p.english for p in train] == ["house", "tree", "tree house"]


def test_documents_use_the_notebook_template_layout():
    template = load_template("en-de-translation")
    assert format_pair("cheese", "Käse") == template.format_example(Example("cheese", "Käse"))
    pairs = [Pair("cat", "Katze", ("Katze",), 1), Pair("dog", "Hund", ("Hund",), 1)]
    documents = pair_documents(pairs, [("a dog", "ein Hund")], num_chars=20_000, seed=3,
                               lead_in=[(e.input, e.output) for e in template.examples])
    assert sum(map(len, documents)) >= 20_000
    assert documents == pair_documents(pairs, [("a dog", "ein Hund")], 20_000, 3,
                                       [(e.input, e.output) for e in template.examples])
    blocks = {"English: cat\nGerman: Katze", "English: dog\nGerman: Hund", "English: a dog\nGerman: ein Hund",
              "German: Katze\nEnglish: cat", "German: Hund\nEnglish: dog", "German: ein Hund\nEnglish: a dog"}
    blocks |= {template.format_example(e) for e in template.examples}
    opening = template.example_separator.join([template.instruction] + [template.format_example(e)
                                                                         for e in template.examples])
    for doc in documents:
        assert len(doc) >= 1500  # a training row's worth of text, so rows are not mostly padding
        lines = [line for line in doc.split("\n") if not line.startswith("Translate")]
        assert all("\n".join(lines[i:i + 2]) in blocks for i in range(0, len(lines), 2)), doc
    assert any(opening + "\n" in doc for doc in documents)  # notebook 03's own prompt, continued
    assert any("Translate German to English.\nGerman:" in doc for doc in documents)
    assert any("Translate English to German.\nEnglish:" in doc for doc in documents)


def test_translation_accuracy_scores_exact_and_accepted_answers():
    from types import SimpleNamespace

    from glmkit.lab.word_pairs import translation_accuracy

    answers = {"cat": " Katze", "dog": " Köter", "tree": "  Wald"}
    calls = []

    class Backend:  # the scoring is word_pairs' own logic; generation itself is tested elsewhere
        def generate(self, prompts, **settings):
            calls.append((len(prompts), settings))
            return [SimpleNamespace(completion=answers[p.split()[-2]], finish_reason="stop") for p in prompts]

    items = [{"english": w, "german": g, "accepted": acc, "prompt": f"English: {w}\nGerman:"}
             for w, g, acc in [("cat", "Katze", ["Katze"]), ("dog", "Hund", ["Hund", "Köter"]),
                               ("tree", "Baum", ["Baum"])]]
    scores = translation_accuracy(Backend(), items, batch_size=2, max_new_tokens=7)
    assert (scores["count"], scores["exact"], scores["accepted"]) == (3, 1 / 3, 2 / 3)
    assert [r["answer"] for r in scores["rows"]] == ["Katze", "Köter", "Wald"]
    assert calls == [(2, {"max_new_tokens": 7, "stop": ["\n"]}), (1, {"max_new_tokens": 7, "stop": ["\n"]})]
