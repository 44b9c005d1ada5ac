"""GLMTokenizer against the shipped demo ice_text.model (CPU, no network)."""
import os
import shutil

import pytest
import sentencepiece as spm

from glmkit.tokenizer import (DEMO_TOKENIZER_DIR, MAX_BLANK, MODEL_FILE, NUM_IMAGE_TOKENS, SPECIAL_TOKENS,
                              GLMTokenizer, Token, _preprocess)

DEMO_FILE = DEMO_TOKENIZER_DIR / MODEL_FILE


@pytest.fixture(scope="module")
def tok():
    return GLMTokenizer(DEMO_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def raw_sp():
    """The demo model exactly as shipped, without the pieces glmkit appends."""
    return spm.SentencePieceProcessor(model_file=str(DEMO_FILE))


def sat_preprocess(text):
    """SAT's documented preprocessing, written as plainly as possible, as the reference."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for n in range(MAX_BLANK, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return text


def sat_decode(tok, ids):
    """SAT's decode: SentencePiece's decode of the whole sequence, then the replacements undone."""
    text = tok._sp.decode([i - NUM_IMAGE_TOKENS for i in ids])
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    for n in range(2, MAX_BLANK + 1):
        text = text.replace(f"<|blank_{n}|>", " " * n)
    return text


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Translate to German: Hello, world! German:",
    "清华大学位于北京。GLM-130B 是一个双语模型。",
    "def f(x):\n\tif x:\n        return {'a': 1}\n\n\n    # done\n",
    "\tleading tab and trailing spaces   ",
    "line one\nline two\r\nline three\n",
    "emoji 😀👍🏽 and rare ꙮ 𝔘𝔫𝔦 chars, combining é",
    "a" + " " * 81 + "b" + " " * 160 + "c" + " " * 161,
    "\n",
    "x",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(NUM_IMAGE_TOKENS <= i < tok.num_tokens for i in ids)
    assert tok.decode(ids) == text
    # Same ids as SAT's algorithm (replace, then SentencePiece) and the same text as SAT's decode.
    assert ids == [NUM_IMAGE_TOKENS + i for i in tok._sp.encode(sat_preprocess(text))]
    assert sat_decode(tok, ids) == text


@pytest.mark.parametrize("n", range(1, 101))
def test_space_runs(tok, n):
    text = "a" + " " * n + "b"
    assert _preprocess(text)[0] == sat_preprocess(text)
    assert tok.decode(tok.encode(text)) == text
    blanks = [t for t in tok.tokens(text) if t.kind == "blank"]
    assert sum(t.end - t.start for t in blanks) == (n - 1 if n % 80 == 1 else n)
    assert all(t.text == " " * int(t.piece[8:-2]) for t in blanks)


def test_byte_fallback_round_trip(tok):
    text = "😀 ꙮ 中"
    pieces = [tok.id_to_piece(i) for i in tok.encode(text)]
    assert "<0xF0>" in pieces  # the emoji is not in the 2000-piece model, so it is spelled in bytes
    assert tok.decode(tok.encode(text)) == text
    # A lone continuation byte is not valid UTF-8: decoded as the replacement character.
    assert tok.decode([tok.piece_to_id("<0x80>")]) == "\ufffd"


def test_id_layout(tok, raw_sp):
    base = NUM_IMAGE_TOKENS + raw_sp.get_piece_size()
    assert raw_sp.get_piece_size() == 2000 == tok.num_original_pieces
    assert [tok.special_ids[name] for name in SPECIAL_TOKENS] == list(range(base, base + 8))
    assert (tok.mask_id, tok.gmask_id, tok.smask_id) == (base, base + 1, base + 2)
    assert (tok.eod_id, tok.sop_id, tok.eop_id) == (base + 3, base + 4, base + 5)
    assert tok.mask_ids == {"[MASK]": base, "[sMASK]": base + 2, "[gMASK]": base + 1}
    assert tok.id_to_piece(base + 8) == "<|tab|>"
    assert [tok.id_to_piece(base + 7 + n) for n in (2, 80)] == ["<|blank_2|>", "<|blank_80|>"]
    assert tok.id_to_piece(base + 8 + 80) == "<0x00>"
    assert tok.id_to_piece(tok.num_tokens - 1) == "<0xFF>"
    assert tok.num_tokens == 20000 + 2000 + 8 + 1 + 79 + 256 == 22344
    assert tok.padded_vocab_size() == 22400
    assert tok.padded_vocab_size(1024) == 22528
    assert tok.eos_id == NUM_IMAGE_TOKENS + raw_sp.eos_id() == 20002
    assert tok.id_to_piece(tok.eos_id) == "</s>"


def test_pieces_and_images(tok):
    assert tok.id_to_piece(0) == "<image_0>"
    assert tok.id_to_piece(19999) == "<image_19999>"
    assert tok.piece_to_id("<image_7>") == 7
    assert tok.piece_to_id("<|blank_5|>") == tok.special_ids["<dBLOCK>"] + 1 + 4
    for token_id in (20003, tok.sop_id, tok.num_tokens - 1):
        assert tok.piece_to_id(tok.id_to_piece(token_id)) == token_id
    with pytest.raises(ValueError, match="not a piece"):
        tok.piece_to_id("no-such-piece")


def test_decode_specials_and_errors(tok):
    ids = tok.encode("Paris") + [tok.eop_id]
    assert tok.decode(ids) == "Paris<eop>"
    assert tok.decode(ids, skip_special=True) == "Paris"
    assert tok.decode([5, tok.mask_id]) == "<image_5>[MASK]"
    assert tok.decode([5, tok.mask_id], skip_special=True) == ""
    with pytest.raises(ValueError, match=r"22344 .*22344 ids"):
        tok.decode([tok.num_tokens])
    with pytest.raises(ValueError, match="-1"):
        tok.id_to_piece(-1)
    with pytest.raises(TypeError):
        tok.decode([1.5])


def test_mask_splitting(tok):
    text = "A [MASK] B [sMASK] C [gMASK]"
    ids = tok.encode_with_masks(text)
    expected = (tok.encode("A ") + [tok.mask_id] + tok.encode(" B ") + [tok.smask_id]
                + tok.encode(" C ") + [tok.gmask_id])
    assert ids == expected
    assert tok.encode("") == []
    # Each piece gets its own dummy prefix, so " B" after a mask starts with a lone "▁" piece.
    assert [tok.id_to_piece(i) for i in ids[3:5]] == ["\u2581", "\u2581B"]
    # encode() treats mask names as text; lookalikes stay text in encode_with_masks too.
    assert tok.mask_id not in tok.encode("[MASK]")
    assert tok.encode_with_masks("a [xMASK] b") == tok.encode("a [xMASK] b")
    assert [t.id for t in tok.tokens(text)] == ids
    specials = [t for t in tok.tokens(text) if t.kind == "special"]
    assert [(t.text, t.start, t.end) for t in specials] == [("[MASK]", 2, 8), ("[sMASK]", 11, 18),
                                                             ("[gMASK]", 21, 28)]


def test_dummy_prefix(tok):
    with_prefix = [tok.id_to_piece(i) for i in tok.encode("hello world")]
    without = [tok.id_to_piece(i) for i in tok.encode("hello world", add_dummy_prefix=False)]
    assert with_prefix[0].startswith("\u2581") and not without[0].startswith("\u2581")
    assert tok.decode(tok.encode("hello world", add_dummy_prefix=False)) == "hello world"
    assert tok.encode("", add_dummy_prefix=False) == []
    assert tok.encode("\nx", add_dummy_prefix=False)[0] == tok.piece_to_id("<n>")
    plain, prefixed = tok.encode("a\nb", add_dummy_prefix=False), tok.encode("a\nb")
    assert plain[0] != prefixed[0] and plain[1:] == prefixed[1:]
    # SentencePiece drops the first piece's space when decoding, so a leading space needs the prefix.
    assert tok.decode(tok.encode(" a")) == " a"
    assert tok.decode(tok.encode(" a", add_dummy_prefix=False)) == "a"
    tokens = tok.tokens("hi", add_dummy_prefix=False, masks=False)
    assert [t.id for t in tokens] == tok.encode("hi", add_dummy_prefix=False)
    assert "".join(t.text for t in tokens) == "hi" and tokens[0].start == 0


def check_spans(text, tokens):
    pos = 0
    for t in tokens:
        assert isinstance(t, Token)
        assert t.start == pos or (t.start == t.end and t.start <= pos), t
        assert t.text == text[t.start:t.end]
        pos = max(pos, t.end)
    assert "".join(t.text for t in tokens) == text
    assert pos == len(text)


@pytest.mark.parametrize("text", TEXTS + ["[gMASK]", "x [MASK]\n\t[sMASK]  y", " lead", "  two", ""])
def test_offsets_cover_text(tok, text):
    tokens = tok.tokens(text)
    assert [t.id for t in tokens] == tok.encode_with_masks(text)
    check_spans(text, tokens)
    plain = tok.tokens(text, masks=False)
    assert [t.id for t in plain] == tok.encode(text)
    check_spans(text, plain)
    no_prefix = tok.tokens(text, add_dummy_prefix=False)
    assert [t.id for t in no_prefix] == tok.encode_with_masks(text, add_dummy_prefix=False)
    check_spans(text, no_prefix)


def test_token_kinds_and_byte_spans(tok):
    text = "a\tb\n   é😀"
    tokens = tok.tokens(text)
    assert tokens[0].kind == "text" and (tokens[0].start, tokens[0].end) == (0, 1)
    assert [(t.kind, t.text) for t in tokens if t.kind in ("tab", "newline", "blank")] == [
        ("tab", "\t"), ("newline", "\n"), ("blank", "   ")]
    byte_tokens = [t for t in tokens if t.kind == "byte"]
    assert len(byte_tokens) == 2 + 4
    # Only the last byte of each character covers it; the others are empty spans at its start.
    assert [(t.start, t.end) for t in byte_tokens] == [(7, 7), (7, 8)] + [(8, 8)] * 3 + [(8, 9)]
    assert [t.text for t in byte_tokens if t.text] == ["é", "😀"]
    first = tok.tokens("\nx")
    assert (first[0].kind, first[0].piece, first[0].text) == ("dummy_prefix", "\u2581", "")


def test_literal_piece_names_are_ambiguous(tok):
    # GLM's scheme cannot tell a typed "<n>" from a newline: both are the user-defined piece.
    assert tok.encode("a<n>b") == tok.encode("a\nb")
    tokens = tok.tokens("a<n>b")
    assert [(t.kind, t.text) for t in tokens][1] == ("newline", "<n>")


def test_icetk_loads_demo_model():
    from icetk.text_tokenizer import TextTokenizer

    tt = TextTokenizer(str(DEMO_FILE))
    assert tt.num_tokens == 2000
    assert tt.convert_token_to_id("<n>") == 3 and tt.convert_id_to_token(2) == "</s>"
    assert tt.decode(tt.encode("import os<n>print(1)")) == "import os<n>print(1)"


def test_demo_model_conventions(raw_sp):
    assert DEMO_FILE.stat().st_size < 1_000_000
    assert (raw_sp.unk_id(), raw_sp.bos_id(), raw_sp.eos_id()) == (0, 1, 2)
    pieces = [raw_sp.id_to_piece(i) for i in range(raw_sp.get_piece_size())]
    assert pieces[:4] == ["<unk>", "<s>", "</s>", "<n>"]
    assert not any(raw_sp.is_byte(i) for i in range(len(pieces)))
    assert not set(SPECIAL_TOKENS + ("<|tab|>", "<|blank_2|>")) & set(pieces)


def test_missing_file(tmp_path, monkeypatch):
    import icetk.utils

    def no_download(path):
        raise AssertionError(f"must not download for an explicit folder: {path}")

    monkeypatch.setattr(icetk.utils, "auto_create", no_download)
    with pytest.raises(FileNotFoundError) as info:
        GLMTokenizer.load(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and MODEL_FILE in message and "GLMTokenizer.load()" in message


def test_load_from_icetk_home(tmp_path, monkeypatch):
    import icetk.utils
    import requests

    home = tmp_path / "home"
    (home / ".icetk_models").mkdir(parents=True)
    shutil.copy(DEMO_FILE, home / ".icetk_models" / MODEL_FILE)
    real_expanduser = os.path.expanduser
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(os.path, "expanduser",
                        lambda p: str(home) + p[1:] if p.startswith("~") else real_expanduser(p))

    def no_network(*args, **kwargs):
        raise AssertionError("no download expected: the file is already in ~/.icetk_models")

    monkeypatch.setattr(requests, "get", no_network)
    calls = []
    real_auto_create = icetk.utils.auto_create
    monkeypatch.setattr(icetk.utils, "auto_create", lambda p: calls.append(p) or real_auto_create(p))

    loaded = GLMTokenizer.load()
    assert calls == [str(home / ".icetk_models" / MODEL_FILE)]
    assert loaded.model_file == home / ".icetk_models" / MODEL_FILE
    assert loaded.encode("hello\nworld") == GLMTokenizer(DEMO_TOKENIZER_DIR).encode("hello\nworld")


def test_lone_surrogates_are_refused_with_the_character_index(tok):
    """SentencePiece takes UTF-8; a lone surrogate used to surface as an opaque pybind cast error."""
    with pytest.raises(ValueError, match=r"lone surrogate '\\ud800' at character 2"):
        tok.encode("ab\ud800c")
    with pytest.raises(ValueError, match="at character 7"):  # counted over the whole prompt, masks included
        tok.encode_with_masks("[MASK] \udfff")
    with pytest.raises(ValueError, match="at character 0"):
        tok.tokens("\udc80 x")
    with pytest.raises(TypeError, match="must be a string"):
        tok.encode(5)
    assert tok.decode(tok.encode("ok \U0001f600")) == "ok \U0001f600"  # astral characters are fine


def test_control_ids_are_the_specials_and_no_text(tok):
    controls = set(tok.control_ids)
    assert set(tok.special_ids.values()) | {tok.eos_id} <= controls
    text_ids = set(tok.encode("def f(x):\n\treturn x  + 1 é"))
    assert not text_ids & controls
