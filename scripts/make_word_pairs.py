"""English -> German word pairs for the demo model from Debian's FreeDict dictionaries; one seeded command.

Reads dict-freedict-eng-deu (and dict-freedict-deu-eng, to pick the common sense: glmkit.lab.word_pairs),
from --dictd (a folder holding freedict-eng-deu.index/.dict.dz and the deu-eng pair) or, without it,
from the Debian packages it fetches with `apt-get download` and unpacks with `dpkg -x` into a temporary
folder. Debian has no English <-> Chinese FreeDict dictionary (nor CC-CEDICT), so pairs are English ->
German only. Writes one gzip JSON file: the training pairs, the held-out pairs and the example phrases.

    python scripts/make_word_pairs.py [--out artifacts/demo-corpus/word-pairs.json.gz]
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from glmkit.config import REPO_ROOT
from glmkit.widgets.templates import load_template
from glmkit.lab.word_pairs import (PAIRS_FORMAT, build_pairs, example_phrases, parse_entry, read_dictd,
                                   split_pairs)

PAIRS_FILE = REPO_ROOT / "artifacts" / "demo-corpus" / "word-pairs.json.gz"
PACKAGES = {"eng-deu": "dict-freedict-eng-deu", "deu-eng": "dict-freedict-deu-eng"}


def fetch_dictd(folder: Path) -> tuple[Path, dict[str, str]]:
    """Download and unpack the Debian packages into `folder`; the dictd folder and the package versions."""
    versions = {}
    for package in PACKAGES.values():
        subprocess.run(["apt-get", "download", package], cwd=folder, check=True, capture_output=True)
        deb = next(folder.glob(f"{package}_*.deb"))
        versions[package] = deb.name.split("_")[1]
        subprocess.run(["dpkg", "-x", str(deb), str(folder / "root")], check=True)
    return folder / "root" / "usr" / "share" / "dictd", versions


def load_entries(dictd: Path, name: str) -> list:
    index, data = dictd / f"freedict-{name}.index", dictd / f"freedict-{name}.dict.dz"
    if not index.is_file() or not data.is_file():
        raise SystemExit(f"--dictd {dictd} has no {index.name} and {data.name} (Debian's {PACKAGES[name]})")
    return [e for e in map(parse_entry, read_dictd(index, data)) if e is not None]


def main(argv: list[str] | None = None) -> None:
    """Build the pairs file and print its statistics."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=PAIRS_FILE)
    p.add_argument("--dictd", type=Path, help="folder with the unpacked dictionaries (default: apt-get them)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--heldout", type=int, default=300, help="held-out pairs")
    p.add_argument("--pool", type=int, default=3000, help="held-out pairs come from this many common words")
    p.add_argument("--max-single", type=int, default=4_000, help="the most common one-word training pairs kept")
    p.add_argument("--max-multi", type=int, default=1_000, help="the most common multi-word training pairs kept")
    p.add_argument("--max-words", type=int, default=2, help="words per headword and per translation")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        dictd, versions = (args.dictd, {}) if args.dictd else fetch_dictd(Path(tmp))
        forward, backward = load_entries(dictd, "eng-deu"), load_entries(dictd, "deu-eng")
    reverse = {pair.english: pair for pair in build_pairs(backward, args.max_words)}
    pairs = build_pairs(forward, args.max_words, reverse)
    # The few-shot template's own examples (cheese, good morning, ...) are in every test prompt: none is tested.
    shown = {w for e in load_template("en-de-translation").examples for w in e.input.split()}
    train, heldout, phrases = split_pairs(pairs, example_phrases(forward), args.heldout, args.seed, args.pool,
                                          args.max_single, args.max_multi, reserved=shown)
    payload = {"format": PAIRS_FORMAT, "source": {"packages": versions or "from --dictd", "entries": len(forward),
                                                  "reverse_entries": len(backward), "pairs": len(pairs)},
               "settings": {k: v for k, v in vars(args).items() if k not in ("out", "dictd")},
               "train": [dataclasses.asdict(x) for x in train], "heldout": [dataclasses.asdict(x) for x in heldout],
               "phrases": phrases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:  # byte-reproducible
        f.write(json.dumps(payload, ensure_ascii=False).encode("utf-8"))
    print(f"{len(forward)} eng-deu entries -> {len(pairs)} pairs; {len(train)} train, {len(heldout)} held out, "
          f"{len(phrases)} phrases; {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) "
          f"in {time.perf_counter() - t0:.0f} s")
    print("held out, first 10:", ", ".join(f"{x.english} -> {x.german}" for x in heldout[:10]))


if __name__ == "__main__":
    sys.exit(main())
