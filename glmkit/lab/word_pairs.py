"""English -> German word and phrase pairs from a FreeDict dictionary, and few-shot training documents of them.

A dictd database is two files: `<name>.index`, one line per headword, "headword TAB offset TAB length" with
the numbers in dictd's base-64 digits, and `<name>.dict.dz`, the entries' text (gzip: dictzip only adds
random access, which reading the whole file does not need). FreeDict's eng-deu entries (made from the Ding
dictionary) read:

    house /hˈaʊs/                                     headword, pronunciation, optional (forms) and <pos>
    Haus <neut>                                       translations, comma-separated, with <grammar> [domain]
          "build a house"  - ein Haus bauen             examples: phrase pairs
     see: {houses}, {open house}                      cross references (and "Synonyms: {...}")

Pairs keep headwords and translations of a few plain words (letters, inner hyphens and apostrophes). A
headword with several entries ("dog": Bandhaken [techn.], Hund [zool.], ...) takes the first translation of
the entry with the most examples and cross references, the dictionary's own sign of a common sense; every
translation of every entry is kept as an accepted answer. Documents are lines in notebook 03's few-shot
layout ("English: cheese\\nGerman: Käse"), several pairs to a document.
"""
from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAIRS_FORMAT = "glmkit-word-pairs-1"  # the file scripts/make_word_pairs.py writes
DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
# The layout of configs/templates/en-de-translation.yaml (notebook 03); a test checks they agree.
INSTRUCTION = {"en-de": "Translate English to German.", "de-en": "Translate German to English."}
PREFIX = {"en": "English:", "de": "German:"}

_ANNOTATION = re.compile(r"<[^<>]*>|\[[^\[\]]*\]|\([^()]*\)|\{[^{}]*\}|/[^/]*/")
_WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")  # letters, with inner hyphens or apostrophes
_EXAMPLE = re.compile(r'^\s+"(.+)"\s+-\s+(.+)$')
_OPEN, _CLOSE = "<[({", ">])}"


def _words(text: str) -> set[str]:
    return set(text.lower().split())


def dictd_number(digits: str) -> int:
    """An offset or length of a dictd index line (base 64, most significant digit first)."""
    value = 0
    for char in digits:
        index = DICTD_DIGITS.find(char)
        if index < 0:
            raise ValueError(f"{digits!r} is not a dictd number: {char!r} is no base-64 digit")
        value = value * 64 + index
    return value


def read_dictd(index_path: str | Path, dict_path: str | Path) -> list[str]:
    """The text of every entry, in index order; an entry that several index lines point to comes once."""
    with gzip.open(dict_path, "rb") if str(dict_path).endswith(".dz") else open(dict_path, "rb") as f:
        data = f.read()
    entries, seen = [], set()
    for number, line in enumerate(Path(index_path).read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"{index_path}:{number}: expected 'headword<TAB>offset<TAB>length', got {line!r}")
        span = (dictd_number(fields[1]), dictd_number(fields[2]))
        if span[0] + span[1] > len(data):
            raise ValueError(f"{index_path}:{number}: entry {span} runs past the end of {dict_path}")
        if span not in seen:
            seen.add(span)
            entries.append(data[span[0]:span[0] + span[1]].decode("utf-8"))
    return entries


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets: "Klampe <fem>, Klemme (Werkzeug, alt)" -> 2 parts."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in _OPEN) - (char in _CLOSE)
        if char == "," and depth <= 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def clean_phrase(text: str, max_words: int) -> str | None:
    """`text` without annotations (<masc>, [Br.], (...), {...}, /pron/), if 1..max_words plain words remain."""
    previous = None
    while previous != text:  # nested brackets: strip the innermost first
        previous, text = text, _ANNOTATION.sub(" ", text)
    words = text.split()
    if not 1 <= len(words) <= max_words or not all(_WORD.fullmatch(w) for w in words):
        return None
    return " ".join(words)


@dataclass(frozen=True)
class Entry:
    """One dictionary entry: its headword, translations and example phrase pairs as written."""

    headword: str
    translations: tuple[str, ...]
    examples: tuple[tuple[str, str], ...]
    weight: int  # 3 x examples + cross references: how much the dictionary has to say about this sense


def parse_entry(text: str) -> Entry | None:
    """The parts of one FreeDict entry's text; None for an entry without a translation line."""
    lines = [line for line in text.split("\n") if line.strip()]
    if len(lines) < 2:
        return None
    headline = lines[0]
    for marker in (" /", " <"):  # the pronunciation, or the part of speech where none is given
        if marker in headline:
            headline = headline[:headline.index(marker)]
    translations = tuple(t.strip() for t in _split_top_level(lines[1]) if t.strip())
    examples = tuple((m[1].strip(), _split_top_level(m[2])[0].strip())
                     for m in map(_EXAMPLE.match, lines[2:]) if m)
    references = sum(line.count("{") for line in lines[2:] if not _EXAMPLE.match(line))
    return Entry(headline.strip(), translations, examples, 3 * len(examples) + references)


@dataclass(frozen=True)
class Pair:
    """An English headword, the German target and every German translation the dictionary gives for it."""

    english: str
    german: str
    accepted: tuple[str, ...]
    commonness: int  # dictionary headwords and examples holding its rarest English word


def _clean_pair(english: str, german: str, max_words: int) -> tuple[str, str] | None:
    # "Good night!" -> "Gute Nacht!": end punctuation that both sides share is dropped from both.
    end = english.rstrip()[-1:]
    if end in ("!", "?", ".") and german.rstrip().endswith(end):
        english, german = english.rstrip()[:-1], german.rstrip()[:-1]
    english, german = clean_phrase(english, max_words), clean_phrase(german, max_words)
    return (english, german) if english and german else None


def build_pairs(entries: list[Entry], max_words: int = 3, reverse: dict[str, Pair] | None = None) -> list[Pair]:
    """One pair per usable headword, in first-seen order (see the module docstring for the choice).

    With `reverse` (the pairs of the German -> English dictionary, made by this function, by German
    word), the target is the most common German translation that translates back to the headword:
    "bird" gets Vogel rather than the slang Mieze that its best-cited entry gives.

    A word that many headwords and examples use ("water": "water bottle", "a glass of water", ...) is a
    common one: `commonness` ranks pairs by it, so the held-out set and the training pairs favour the
    words a notebook user types over "Satterthwaite's test"."""
    uses: dict[str, int] = {}
    for entry in entries:
        for text in {entry.headword, *(e for e, _ in entry.examples)}:
            for word in _words(text):
                uses[word] = uses.get(word, 0) + 1
    by_headword: dict[str, list[tuple[Entry, list[str]]]] = {}
    for entry in entries:
        cleaned = [p for t in entry.translations if (p := _clean_pair(entry.headword, t, max_words))]
        if cleaned:
            english = cleaned[0][0]
            german = list(dict.fromkeys(g for e, g in cleaned if e == english))
            by_headword.setdefault(english, []).append((entry, german))
    pairs = []
    for english, senses in by_headword.items():
        order = sorted(range(len(senses)), key=lambda i: (-senses[i][0].weight, i))
        german = senses[order[0]][1][0]
        if reverse:
            back = [(reverse[g].commonness, -rank) for rank, g in enumerate(g for i in order for g in senses[i][1])
                    if g in reverse and english.lower() in (e.lower() for e in reverse[g].accepted)]
            german = [g for i in order for g in senses[i][1]][-max(back)[1]] if back else german
        accepted = tuple(dict.fromkeys(g for _, translations in senses for g in translations))
        commonness = min(uses.get(w, 0) for w in _words(english))
        pairs.append(Pair(english, german, accepted, commonness))
    return pairs


def example_phrases(entries: list[Entry], max_words: int = 6) -> list[tuple[str, str]]:
    """The entries' example phrase pairs ("build a house" -> "ein Haus bauen"), cleaned, each once."""
    phrases = (_clean_pair(e, g, max_words) for entry in entries for e, g in entry.examples)
    return list(dict.fromkeys(p for p in phrases if p))


def split_pairs(pairs: list[Pair], phrases: list[tuple[str, str]], num_heldout: int, seed: int, pool: int,
                max_words: int | None = None, max_multi: int | None = None, reserved: set[str] = frozenset()
                ) -> tuple[list[Pair], list[Pair], list[tuple[str, str]]]:
    """Held-out pairs drawn (seeded) from the `pool` most common one-word headwords of 3+ letters (the
    test is translating a word never seen paired), none of them `reserved` (words the prompt's own
    examples show); then the `max_words` most common one-word and `max_multi` most common multi-word
    headwords of the rest as training pairs, and the phrases. No training pair or phrase holds a held-out
    headword (or its plural in -s/-es) among its English words: a held-out "water" keeps "a glass of
    water" out too."""
    ranked = sorted(range(len(pairs)), key=lambda i: (-pairs[i].commonness, i))
    reserved = {w.lower() for w in reserved}
    candidates = [i for i in ranked if len(pairs[i].english) >= 3 and " " not in pairs[i].english
                  and pairs[i].english.lower() not in reserved][:pool]
    if num_heldout > len(candidates):
        raise ValueError(f"num_heldout={num_heldout} but only {len(candidates)} pairs to draw from")
    rng = np.random.default_rng(seed)
    heldout_ids = sorted(rng.choice(candidates, size=num_heldout, replace=False).tolist())
    heldout = [pairs[i] for i in heldout_ids]
    banned = [_words(p.english) for p in heldout]
    taken = set(heldout_ids)

    def leaks(english: str) -> bool:
        words = _words(english)
        words |= {w[:-1] for w in words if w.endswith("s")} | {w[:-2] for w in words if w.endswith("es")}
        return any(b <= words for b in banned)

    kept = [pairs[i] for i in ranked if i not in taken and not leaks(pairs[i].english)]
    train = ([p for p in kept if " " not in p.english][:max_words]
             + [p for p in kept if " " in p.english][:max_multi])
    return train, heldout, [p for p in phrases if not leaks(p[0])]


def format_pair(source: str, target: str, direction: str = "en-de") -> str:
    """One few-shot block, as notebook 03's template writes it: "English: cheese\\nGerman: Käse"."""
    first, second = direction.split("-")
    return f"{PREFIX[first]} {source}\n{PREFIX[second]} {target}"


def pair_documents(pairs: list[Pair], phrases: list[tuple[str, str]], num_chars: int, seed: int,
                   lead_in: list[tuple[str, str]] = (), phrase_share: float = 0.2,
                   doc_chars: int = 1500) -> list[str]:
    """Few-shot documents of about `num_chars` characters in all. A document is few-shot groups, one
    after another, until it has `doc_chars` characters (a training row's worth: shorter documents would
    leave rows padded); a group is 1..16 blocks separated by "\n", half of the groups open with the
    instruction line, a tenth are German -> English, some start with `lead_in` (the shipped template's
    examples), and a share of the blocks are example phrases rather than headwords."""
    if not pairs:
        raise ValueError("no pairs to write documents of")
    rng = np.random.default_rng(seed)

    def group() -> list[str]:
        count = 1 if rng.random() < 0.1 else int(rng.integers(2, 17))
        items = []
        for _ in range(count):
            if phrases and rng.random() < phrase_share:
                items.append(phrases[int(rng.integers(len(phrases)))])
            else:
                pair = pairs[int(rng.integers(len(pairs)))]
                items.append((pair.english, pair.german))
        direction = "de-en" if rng.random() < 0.1 else "en-de"
        if direction == "en-de" and lead_in and rng.random() < 0.15:
            items = list(lead_in) + items
        if direction == "de-en":
            items = [(g, e) for e, g in items]
        blocks = [format_pair(a, b, direction) for a, b in items]
        return [INSTRUCTION[direction]] + blocks if rng.random() < 0.5 else blocks

    documents, total = [], 0
    while total < num_chars:
        blocks: list[str] = []
        while sum(len(b) + 1 for b in blocks) < doc_chars:
            blocks += group()
        documents.append("\n".join(blocks))
        total += len(documents[-1])
    return documents


def load_pairs(path: str | Path) -> tuple[list[Pair], list[Pair], list[tuple[str, str]], dict]:
    """Training pairs, held-out pairs, phrases and the rest of a file scripts/make_word_pairs.py wrote."""
    with gzip.open(path, "rb") as f:
        payload = json.loads(f.read().decode("utf-8"))
    if payload.get("format") != PAIRS_FORMAT:
        raise ValueError(f"{path} is not a {PAIRS_FORMAT} file: rebuild it with scripts/make_word_pairs.py")
    train, heldout = ([Pair(p["english"], p["german"], tuple(p["accepted"]), p["commonness"]) for p in payload[k]]
                      for k in ("train", "heldout"))
    return train, heldout, [tuple(p) for p in payload["phrases"]], payload


def translation_accuracy(backend, items: list[dict], batch_size: int = 32, max_new_tokens: int = 12) -> dict:
    """Greedy answers to each item's few-shot `prompt` with stop "\\n", scored by exact match against its
    `german` and against any of its `accepted` translations; per-item rows included."""
    rows = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        results = backend.generate([item["prompt"] for item in chunk], max_new_tokens=max_new_tokens, stop=["\n"])
        for item, result in zip(chunk, results):
            answer = result.completion.strip()
            rows.append({"english": item["english"], "german": item["german"], "answer": answer,
                         "exact": answer == item["german"], "accepted": answer in item["accepted"],
                         "finish_reason": result.finish_reason})
    count = max(1, len(rows))
    return {"count": len(rows), "exact": sum(r["exact"] for r in rows) / count,
            "accepted": sum(r["accepted"] for r in rows) / count, "rows": rows}
