"""GLM-130B's tokenizer: icetk's SentencePiece `ice_text.model` plus the pieces SAT appends to it.

Id layout: 0..19999 are image tokens; text id = SentencePiece id + 20000. After the pieces of
`ice_text.model` come the GLM special pieces ([MASK] [gMASK] [sMASK] <eod> <sop> <eop> <ENC> <dBLOCK>),
then `<|tab|>` and `<|blank_2|>`..`<|blank_80|>`, then the 256 byte-fallback pieces. With the real
130000-piece model that puts [MASK] at 150000; everything here is derived from the loaded file.

Before SentencePiece sees text, `\\n` becomes `<n>`, `\\t` becomes `<|tab|>` and runs of 2..80 spaces
become `<|blank_N|>`; `tokens()` maps every token back to the characters of the original text.
"""
from __future__ import annotations

import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_TOKENIZER_DIR = REPO_ROOT / "demo" / "tokenizer"
MODEL_FILE = "ice_text.model"
ICETK_DIR = "~/.icetk_models"

NUM_IMAGE_TOKENS = 20000
SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "<eod>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
MASK_NAMES = ("[MASK]", "[sMASK]", "[gMASK]")
MASK_PATTERN = re.compile(r"\[[sg]?MASK\]")
NEWLINE_PIECE = "<n>"
TAB_PIECE = "<|tab|>"
MAX_BLANK = 80
SPACE = "\u2581"  # SentencePiece's visible space

# Piece types of sentencepiece_model.proto.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6
_WHITESPACE = re.compile(r"\n|\t| {2,}")
_BLANK_PIECE = re.compile(r"<\|blank_(\d+)\|>")


def check_encodable(text: str, what: str = "text") -> None:
    """ValueError naming the character index when `text` holds a lone surrogate, which UTF-8 cannot encode."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        # SentencePiece takes UTF-8, so pybind would fail with an opaque cast error; say which character.
        raise ValueError(f"{what} holds a lone surrogate {text[error.start]!r} at character {error.start}, "
                         f"which is not valid Unicode: remove it, or decode the source with "
                         f"errors='replace'") from None


def blank_piece(n: int) -> str:
    """The piece that stands for a run of `n` spaces (2 <= n <= 80)."""
    if not 2 <= n <= MAX_BLANK:
        raise ValueError(f"blank pieces cover 2..{MAX_BLANK} spaces, not {n}")
    return f"<|blank_{n}|>"


@dataclass(frozen=True)
class Token:
    """One token and the characters of the original text it covers (`text == original[start:end]`).

    A character that SentencePiece spells with several byte-fallback tokens is covered by the last of
    them; the earlier ones have an empty span at the character's start (this is SentencePiece's own
    convention). A dummy-prefix space that SentencePiece emits as its own token covers nothing.
    kind: "text", "special", "newline", "tab", "blank", "byte", "dummy_prefix", "unknown", "user_defined".
    """

    id: int
    piece: str
    text: str
    start: int
    end: int
    kind: str


def _preprocess(text: str) -> tuple[str, list[tuple[int, int]]]:
    """Replace \\n, \\t and space runs by GLM's pieces; also give each new character's original span."""
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0

    def keep(upto: int) -> None:
        out.append(text[pos:upto])
        spans.extend((i, i + 1) for i in range(pos, upto))

    def replace(start: int, end: int, piece: str) -> None:
        # Every character of the inserted piece points at the whole span it replaces.
        out.append(piece)
        spans.extend([(start, end)] * len(piece))

    for match in _WHITESPACE.finditer(text):
        keep(match.start())
        pos = match.end()
        run = match.group()
        if run == "\n":
            replace(match.start(), pos, NEWLINE_PIECE)
        elif run == "\t":
            replace(match.start(), pos, TAB_PIECE)
        else:
            # Same result as SAT's `for n in 80..2: text = text.replace(" " * n, blank(n))`: whole
            # 80-space pieces first, then the remainder; a single leftover space stays a space.
            start = match.start()
            while start < pos:
                n = min(MAX_BLANK, pos - start)
                if n == 1:
                    out.append(" ")
                    spans.append((start, start + 1))
                else:
                    replace(start, start + n, blank_piece(n))
                start += n
    keep(len(text))
    return "".join(out), spans


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _proto_fields(buf: bytes):
    """Yield (field number, value) of a serialized protobuf message (varint and length fields)."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, i = _varint(buf, i)
        elif wire_type == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"unexpected protobuf wire type {wire_type}")
        yield number, value


def _piece_spans(serialized: bytes) -> list[tuple[int, int, int]]:
    """(sentencepiece id, begin byte, end byte) per piece of a serialized SentencePieceText."""
    # sentencepiece's own proto return type needs protobuf >= 3.20, but icetk pins protobuf < 3.19,
    # so the few fields needed (pieces: id=2, begin=4, end=5) are read from the wire format directly.
    pieces = []
    for number, value in _proto_fields(serialized):
        if number == 2:
            fields = dict(_proto_fields(value))
            pieces.append((fields.get(2, 0), fields.get(4, 0), fields.get(5, 0)))
    return pieces


class GLMTokenizer:
    """GLM-130B's text tokenizer, loaded from a folder that holds `ice_text.model`."""

    def __init__(self, path: str | os.PathLike):
        # icetk imports torchvision when imported, so import it only when a tokenizer is built.
        from icetk import sentencepiece_model_pb2 as sp_model
        from icetk.text_tokenizer import TextTokenizer

        path = Path(path).expanduser()
        self.model_file = path if path.is_file() else path / MODEL_FILE
        if not self.model_file.is_file():
            raise FileNotFoundError(
                f"no {MODEL_FILE} in {path}: GLMTokenizer.load() with no path downloads GLM-130B's "
                f"tokenizer into {ICETK_DIR} through icetk, or copy {MODEL_FILE} into {path} "
                f"(glmkit's small demo model is in {DEMO_TOKENIZER_DIR})")
        text_tokenizer = TextTokenizer(str(self.model_file))
        self.num_original_pieces = text_tokenizer.num_tokens
        proto = text_tokenizer.proto
        Piece = sp_model.ModelProto.SentencePiece
        for name in SPECIAL_TOKENS:
            proto.pieces.append(Piece(piece=name, score=0.0, type=_CONTROL))
        for name in [TAB_PIECE] + [blank_piece(n) for n in range(2, MAX_BLANK + 1)]:
            proto.pieces.append(Piece(piece=name, score=0.0, type=_USER_DEFINED))
        proto.trainer_spec.byte_fallback = True
        for byte in range(256):
            proto.pieces.append(Piece(piece=f"<0x{byte:02X}>", score=0.0, type=_BYTE))
        text_tokenizer.refresh()
        self._sp = text_tokenizer.sp
        self._types = [piece.type for piece in proto.pieces]
        self._pieces = [piece.piece for piece in proto.pieces]

        self._special_ids = {name: NUM_IMAGE_TOKENS + self._sp.piece_to_id(name) for name in SPECIAL_TOKENS}
        self._newline = self._sp.piece_to_id(NEWLINE_PIECE)
        if self._pieces[self._newline] != NEWLINE_PIECE:
            raise ValueError(f"{self.model_file} has no {NEWLINE_PIECE} piece, so it is not an ice_text.model")
        if self._sp.eos_id() < 0:
            raise ValueError(f"{self.model_file} defines no end-of-sentence piece </s>")

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> GLMTokenizer:
        """Load from `path`, or from icetk's `~/.icetk_models` (downloading there if needed) when None."""
        if path is not None:
            return cls(path)
        from icetk import utils as icetk_utils

        model_file = os.path.join(os.path.expanduser(ICETK_DIR), MODEL_FILE)
        try:
            icetk_utils.auto_create(model_file)  # downloads only when the file is missing
        except Exception as exc:
            raise RuntimeError(
                f"icetk could not download {MODEL_FILE} into {os.path.dirname(model_file)} ({exc}); "
                f"copy the file there by hand or pass the folder that holds it") from exc
        return cls(os.path.dirname(model_file))

    def __repr__(self) -> str:
        return f"GLMTokenizer({str(self.model_file)!r}, num_tokens={self.num_tokens})"

    # ----- ids -------------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        """All ids: image tokens, the original pieces, specials, tab/blanks and bytes."""
        return NUM_IMAGE_TOKENS + len(self._pieces)

    def padded_vocab_size(self, multiple: int = 128) -> int:
        """`num_tokens` rounded up to a multiple (GLM-130B used 1024 = 128 x 8 ranks: 150528)."""
        return -(-self.num_tokens // multiple) * multiple

    @property
    def special_ids(self) -> dict[str, int]:
        """Id of each GLM special piece, by name ("[MASK]", "<sop>", ...)."""
        return dict(self._special_ids)

    @property
    def control_ids(self) -> tuple[int, ...]:
        """Ids of the control pieces (masks, <sop>, <eop>, <eod>, <s>, </s>, ...): like the image ids below
        NUM_IMAGE_TOKENS, they stand for no text."""
        return tuple(NUM_IMAGE_TOKENS + i for i, kind in enumerate(self._types) if kind == _CONTROL)

    @property
    def mask_ids(self) -> dict[str, int]:
        """Id of each mask, by the name written in prompts ("[MASK]", "[sMASK]", "[gMASK]")."""
        return {name: self._special_ids[name] for name in MASK_NAMES}

    @property
    def mask_id(self) -> int:
        """Id of [MASK] (short blank)."""
        return self._special_ids["[MASK]"]

    @property
    def gmask_id(self) -> int:
        """Id of [gMASK] (long generation at the end)."""
        return self._special_ids["[gMASK]"]

    @property
    def smask_id(self) -> int:
        """Id of [sMASK] (sentence-length blank)."""
        return self._special_ids["[sMASK]"]

    @property
    def eod_id(self) -> int:
        """Id of <eod>."""
        return self._special_ids["<eod>"]

    @property
    def sop_id(self) -> int:
        """Id of <sop>, which starts every generated span."""
        return self._special_ids["<sop>"]

    @property
    def eop_id(self) -> int:
        """Id of <eop>, which ends a generated span."""
        return self._special_ids["<eop>"]

    @property
    def eos_id(self) -> int:
        """Id of SentencePiece's </s> (20002 for the real model)."""
        return NUM_IMAGE_TOKENS + self._sp.eos_id()

    def _check_id(self, token_id) -> int:
        token_id = operator.index(token_id)  # accepts numpy/torch integers, refuses floats
        if not 0 <= token_id < self.num_tokens:
            raise ValueError(f"token id {token_id} is outside the vocabulary of {self.num_tokens} ids "
                             f"(0..{self.num_tokens - 1})")
        return token_id

    def id_to_piece(self, token_id: int) -> str:
        """The piece of any id: `<image_N>` below 20000, else the SentencePiece piece or special name."""
        token_id = self._check_id(token_id)
        if token_id < NUM_IMAGE_TOKENS:
            return f"<image_{token_id}>"
        return self._pieces[token_id - NUM_IMAGE_TOKENS]

    def token_text(self, token_id: int) -> str:
        """What one id stands for on its own, as a label: a word-start piece keeps its space ('▁Haus' ->
        ' Haus', which `decode` drops at the start of a text), `<n>` is a newline; specials, image ids and
        byte pieces appear as their names ('<sop>', '<0xE4>')."""
        token_id = self._check_id(token_id)
        sp_id = token_id - NUM_IMAGE_TOKENS
        if sp_id < 0 or self._types[sp_id] in (_CONTROL, _BYTE):
            return self.id_to_piece(token_id)
        return self._surface(sp_id)

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece (inverse of `id_to_piece`); ValueError if the vocabulary lacks it."""
        image = re.fullmatch(r"<image_(\d+)>", piece)
        if image and int(image.group(1)) < NUM_IMAGE_TOKENS:
            return int(image.group(1))
        sp_id = self._sp.piece_to_id(piece)
        if self._pieces[sp_id] != piece:  # SentencePiece answers unk for unknown pieces
            raise ValueError(f"{piece!r} is not a piece of {self.model_file}")
        return NUM_IMAGE_TOKENS + sp_id

    # ----- encoding --------------------------------------------------------------------------------

    def encode(self, text: str, add_dummy_prefix: bool = True) -> list[int]:
        """Ids of plain text (mask names are ordinary text here), as SAT's GLM130BTokenizer.encode."""
        check_encodable(text)
        pre, _ = _preprocess(text)
        if add_dummy_prefix:
            ids = self._sp.encode(pre)
        else:
            # SAT's trick: a leading <n> takes the dummy prefix; drop everything up to and including it.
            ids = self._sp.encode(NEWLINE_PIECE + pre)
            ids = ids[ids.index(self._newline) + 1:]
        return [NUM_IMAGE_TOKENS + i for i in ids]

    def encode_with_masks(self, text: str, add_dummy_prefix: bool = True) -> list[int]:
        """Ids of a prompt as GLM-130B's generate.py builds them: text between masks encoded separately."""
        check_encodable(text)  # here too, so the index counts from the start of the whole prompt
        ids: list[int] = []
        pos = 0
        for match in MASK_PATTERN.finditer(text):
            ids += self.encode(text[pos:match.start()], add_dummy_prefix)
            ids.append(self._special_ids[match.group()])
            pos = match.end()
        return ids + self.encode(text[pos:], add_dummy_prefix)

    def tokens(self, text: str, masks: bool = True, add_dummy_prefix: bool = True) -> list[Token]:
        """Tokens with their spans in `text`; ids equal encode_with_masks (masks=True) or encode."""
        check_encodable(text)
        if not masks:
            return self._text_tokens(text, 0, len(text), add_dummy_prefix)
        out: list[Token] = []
        pos = 0
        for match in MASK_PATTERN.finditer(text):
            out += self._text_tokens(text, pos, match.start(), add_dummy_prefix)
            name = match.group()
            out.append(Token(self._special_ids[name], name, name, match.start(), match.end(), "special"))
            pos = match.end()
        return out + self._text_tokens(text, pos, len(text), add_dummy_prefix)

    def _text_tokens(self, text: str, begin: int, end: int, add_dummy_prefix: bool) -> list[Token]:
        """Tokens of text[begin:end] encoded on its own, with spans into the whole `text`."""
        pre, spans = _preprocess(text[begin:end])
        skip_through_newline = not add_dummy_prefix
        if skip_through_newline:
            pre, spans = NEWLINE_PIECE + pre, [(0, 0)] * len(NEWLINE_PIECE) + spans
        # SentencePiece reports byte offsets into `pre` (of the input, before its normalizer runs);
        # expand the per-character spans to per-byte ones to map them back.
        byte_start: list[int] = []
        byte_end: list[int] = []
        for char, (s, e) in zip(pre, spans):
            width = len(char.encode("utf-8"))
            byte_start += [s] * width
            byte_end += [e] * width
        byte_start.append(end - begin)

        out: list[Token] = []
        for sp_id, b, e in _piece_spans(self._sp.encode(pre, out_type="serialized_proto")):
            if skip_through_newline:
                skip_through_newline = sp_id != self._newline
                continue
            start = begin + byte_start[b]
            stop = begin + byte_end[e - 1] if e > b else start
            piece = self._pieces[sp_id]
            out.append(Token(NUM_IMAGE_TOKENS + sp_id, piece, text[start:stop], start, stop,
                             self._kind(sp_id, start == stop)))
        return out

    def _kind(self, sp_id: int, empty: bool) -> str:
        piece, kind = self._pieces[sp_id], self._types[sp_id]
        if kind == _CONTROL:
            return "special"
        if kind == _BYTE:
            return "byte"
        if kind == _UNKNOWN:
            return "unknown"
        if kind == _USER_DEFINED:
            if piece == NEWLINE_PIECE:
                return "newline"
            if piece == TAB_PIECE:
                return "tab"
            return "blank" if _BLANK_PIECE.fullmatch(piece) else "user_defined"
        return "dummy_prefix" if piece == SPACE and empty else "text"

    # ----- decoding --------------------------------------------------------------------------------

    def decode(self, ids, skip_special: bool = False) -> str:
        """Text of ids; specials and image ids appear as their names unless `skip_special`."""
        parts: list[str] = []
        pending = bytearray()  # consecutive byte pieces form one UTF-8 string
        at_start = True  # SentencePiece drops the dummy-prefix space of the first text piece
        for token_id in ids:
            token_id = self._check_id(token_id)
            sp_id = token_id - NUM_IMAGE_TOKENS
            kind = self._types[sp_id] if sp_id >= 0 else None
            if kind == _BYTE:
                pending.append(int(self._pieces[sp_id][3:5], 16))
                at_start = False
                continue
            if pending:
                parts.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            if kind is None or kind == _CONTROL:
                if not skip_special:
                    parts.append(self.id_to_piece(token_id))
                continue
            surface = self._surface(sp_id)
            if at_start and surface.startswith(" ") and self._pieces[sp_id].startswith(SPACE):
                surface = surface[1:]
            at_start = False
            parts.append(surface)
        if pending:
            parts.append(pending.decode("utf-8", errors="replace"))
        return "".join(parts)

    def _surface(self, sp_id: int) -> str:
        """The text a non-special, non-byte piece stands for."""
        piece, kind = self._pieces[sp_id], self._types[sp_id]
        if kind == _UNKNOWN:
            return " \u2047 "  # what SentencePiece prints for <unk>
        if kind == _USER_DEFINED:
            if piece == NEWLINE_PIECE:
                return "\n"
            if piece == TAB_PIECE:
                return "\t"
            blank = _BLANK_PIECE.fullmatch(piece)
            return " " * int(blank.group(1)) if blank else piece
        return piece.replace(SPACE, " ")
