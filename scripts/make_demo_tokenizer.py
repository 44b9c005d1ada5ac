"""Train the small demo `ice_text.model` that glmkit ships for tests and the demo model.

The real GLM-130B tokenizer is icetk's `ice_text.model`, a SentencePiece model of 130000 pieces that is
downloaded on first use. Offline machines cannot get it, so glmkit ships a 2000-piece model made in the
same conventions: unk=0, `<s>`=1, `</s>`=2, `<n>` as a user-defined piece, no byte pieces and no GLM
special pieces (glmkit's tokenizer appends those at load time, exactly as it does for the real model).

The corpus is the Python standard library's own source, so every machine can rebuild it offline:
top-level `*.py` files in sorted order, capped in size so training takes seconds. Training is
deterministic (no input shuffling or sampling, one thread). The shipped file was made with the Python
printed by this script; another Python version has other stdlib sources and gives a different model.

With --pairs (the word-pairs file of scripts/make_word_pairs.py) the corpus is a mix: --pair-bytes of
few-shot lines made of the training pairs and phrases ("English: cheese German: Käse"; no held-out pair),
then the stdlib lines up to the same total size, so German gets its letters (ä ö ü ß) and word pieces
while the vocabulary keeps its size and conventions.

Usage: python scripts/make_demo_tokenizer.py [--out demo/tokenizer/ice_text.model] [--pairs FILE]
"""

import argparse
import hashlib
import io
import re
import sys
import sysconfig
import time
from pathlib import Path

import sentencepiece as spm

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "demo" / "tokenizer" / "ice_text.model"
VOCAB_SIZE = 2000
CORPUS_BYTES = 3_000_000


def corpus_lines(max_bytes: int = CORPUS_BYTES, lines: list[str] | None = None) -> list[str]:
    """`lines`, then lines of the stdlib's top-level sources, whitespace runs collapsed, in a fixed order,
    until `max_bytes` in all."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines = list(lines or [])
    total = sum(len(line.encode("utf-8")) + 1 for line in lines)
    for path in sorted(stdlib.glob("*.py")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            # The GLM tokenizer turns tabs and runs of 2+ spaces into their own pieces before
            # SentencePiece sees the text, so the model itself only ever sees single spaces.
            line = re.sub(r"\s+", " ", line).strip()
            if not line:
                continue
            lines.append(line)
            total += len(line.encode("utf-8")) + 1
            if total >= max_bytes:
                return lines
    return lines


def pair_lines(path: Path, max_bytes: int, blocks_per_line: int = 8) -> list[str]:
    """Few-shot documents of the training pairs and phrases, in file order, until `max_bytes`: each line
    `blocks_per_line` blocks with newlines as the `<n>` the GLM tokenizer gives SentencePiece, so the
    pieces after a newline ("English", "German") are learnt without the word-start space."""
    from glmkit.lab.word_pairs import format_pair, load_pairs

    train_pairs, _, phrases, _ = load_pairs(path)
    blocks = [format_pair(e, g) for e, g in [(p.english, p.german) for p in train_pairs] + list(phrases)]
    lines, total = [], 0
    for start in range(0, len(blocks), blocks_per_line):
        line = "\n".join(blocks[start:start + blocks_per_line]).replace("\n", "<n>")
        lines.append(line)
        total += len(line.encode("utf-8")) + 1
        if total >= max_bytes:
            break
    return lines


def train(lines: list[str], vocab_size: int = VOCAB_SIZE) -> bytes:
    """Train the unigram model and return its serialized ModelProto."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        model_type="unigram",
        vocab_size=vocab_size,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=["<n>"],
        # Identity normalization keeps the text exactly as written (no NFKC folding of full-width
        # characters or ligatures), so decode(encode(x)) == x and piece offsets map 1:1 onto the input.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        # Byte pieces are appended by glmkit's tokenizer, as for the real ice_text.model.
        byte_fallback=False,
        character_coverage=0.9995,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=1 << 16,
        num_threads=1,
        minloglevel=2,
    )
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    """Build the demo model and print its statistics."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--pairs", type=Path, help="word-pairs file (scripts/make_word_pairs.py) to mix in")
    parser.add_argument("--pair-bytes", type=int, default=600_000, help="bytes of pair lines with --pairs")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    lines = corpus_lines(lines=pair_lines(args.pairs, args.pair_bytes) if args.pairs else None)
    model = train(lines)
    seconds = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(model)

    sp = spm.SentencePieceProcessor(model_proto=model)
    sample = "def tokenize(text):\n    return text.split()\nEnglish: cheese\nGerman: Käse"
    print(f"python        {sys.version.split()[0]} (stdlib {sysconfig.get_paths()['stdlib']})")
    print(f"corpus        {len(lines)} lines, {sum(len(x) + 1 for x in lines)} chars")
    print(f"pieces        {sp.get_piece_size()} (unk={sp.unk_id()} bos={sp.bos_id()} eos={sp.eos_id()} "
          f"<n>={sp.piece_to_id('<n>')})")
    print(f"file          {args.out} ({len(model)} bytes, sha256 {hashlib.sha256(model).hexdigest()[:16]})")
    print(f"train time    {seconds:.1f} s")
    print(f"sample        {sp.encode(sample.replace(chr(10), '<n>'), out_type=str)}")


if __name__ == "__main__":
    main()
