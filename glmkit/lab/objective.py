"""GLM-130B's blank-infilling objective for small GLMs: samples and packed batches (glmkit.lab.training trains on them).

Every sample is one generation `infilling.fill_blanks` runs, with the right answer as target:
* [gMASK]: a window's prefix is the prompt (`plan_prompt` appends [gMASK], no eos) and the rest is generated
  left to right; eop follows only where the window reaches the end of its document.
* [MASK]/[sMASK]: 1..max_blanks spans (a few words; a sentence or line) become masks, eos follows unless the
  text ends with a mask; one blank is generated, earlier blanks spliced in as `fill_blanks` splices its own
  fills, later ones still masks, positions pinned to its mask; its target is its tokens, then eop.
One generated blank per sample, not GLM's "all spans appended after the context": glmkit (like GLM-130B's
generate.py) fills masks one after another, splicing each fill into the bidirectional context, so appended
spans would train later blanks on contexts inference never builds. Short blank samples are packed several to
a row with block-diagonal attention. Contexts come from `plan_prompt` and layouts from
`generation.prefill_inputs`/`next_positions`, so training and inference cannot drift. Batch i of a stream
is a pure function of (seed, i): runs repeat with any number of data-loader workers.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterator

import numpy as np
import torch

from ..generate.tokens import Context, next_positions, prefill_inputs
from ..generate.blanks import plan_prompt
from ..tokenizer import GLMTokenizer

IGNORE = -100  # label of positions that predict nothing (context, padding)
_WORDS = re.compile(r"\w+|[^\w\s]")  # [MASK] blanks are runs of these: names, numbers, punctuation marks
# [sMASK] blanks are sentences: from a non-space character to [.!?] before whitespace, or to the line's end.
_SENTENCES = re.compile(r"\S(?:[^\n]*?(?:[.!?](?=\s)|\S(?=[ \t]*(?:\n|$))))?")


@dataclass(frozen=True)
class ObjectiveSettings:
    """How samples are drawn: row length, the share of [gMASK] rows and the size of blanks."""

    sequence_length: int = 512
    gmask_fraction: float = 0.6  # share of rows holding one [gMASK] sample; the others pack blank samples
    smask_fraction: float = 0.3  # share of blank samples that blank out sentences with [sMASK]
    max_prompt_fraction: float = 0.8  # a [gMASK] prompt is at most this share of its window
    blank_window: tuple[int, int] = (24, 192)  # tokens of text in a [MASK]/[sMASK] sample
    mean_blank_words: float = 3.0  # a [MASK] blank covers 1 + Poisson(mean - 1) words or punctuation marks
    extra_blanks: float = 0.5  # a blank sample has 1 + Poisson(extra_blanks) blanks, at most max_blanks
    max_blanks: int = 3


@dataclass(frozen=True)
class Corpus:
    """Plain-text documents and each one's characters per token (to size windows before tokenizing)."""

    texts: tuple[str, ...]
    chars_per_token: tuple[float, ...]

    @cached_property
    def starts(self) -> list[int]:
        """Offset of each document in the concatenated corpus (windows are drawn uniformly over characters)."""
        return [0] + list(np.cumsum([len(t) for t in self.texts])[:-1].tolist())


@dataclass(frozen=True)
class Sample:
    """One generation as inference runs it: the context (ending in sop) and the tokens to generate."""

    context: Context
    targets: tuple[int, ...]  # generated tokens in order; ends with eop where the blank or document ends

    @property
    def num_inputs(self) -> int:  # the last target is predicted but never fed back
        return len(self.context.tokens) + len(self.targets) - 1


@dataclass
class Batch:
    """Packed rows of samples: ids, positions and attention of the GLM layout, and next-token labels."""

    input_ids: torch.Tensor  # (b, s)
    position_ids: torch.Tensor  # (b, s)
    allowed: torch.Tensor  # (b, 1, s, s) bool, True = may attend
    labels: torch.Tensor  # (b, s): the token to predict at each position, IGNORE where none
    scored: torch.Tensor  # (b, s) bool: labels that are text (not eop), the tokens perplexity counts
    num_tokens: int  # input tokens that are not padding

    def _apply(self, fn) -> "Batch":
        return Batch(fn(self.input_ids), fn(self.position_ids), fn(self.allowed), fn(self.labels),
                     fn(self.scored), self.num_tokens)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """The batch on `device`."""
        return self._apply(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """The batch in page-locked memory (DataLoader calls this when pin_memory=True)."""
        return self._apply(torch.Tensor.pin_memory)


def encode_blank(tokenizer: GLMTokenizer, text: str, before: str) -> list[int]:
    """Tokens generation must produce for `text` following `before`, in the form infilling decodes to `text`."""
    # Infilling drops a blank's first word-boundary space and re-inserts one only after non-space text:
    # so a blank after whitespace (or at the start) carries SentencePiece's dummy-prefix space, and a
    # blank glued to the previous word (`self.[MASK]`, `def f[MASK]`) starts without one.
    return tokenizer.encode(text, add_dummy_prefix=not before or before[-1].isspace())


def gmask_sample(tokenizer: GLMTokenizer, prompt: str, continuation: str, ends_document: bool,
                 sequence_length: int) -> Sample | None:
    """`prompt` + [gMASK], then `continuation` generated (truncated to fit); None if nothing fits."""
    try:
        plan = plan_prompt(tokenizer, prompt, sequence_length)
    except ValueError:  # too long, or text that reads as a malformed mask
        return None
    targets = encode_blank(tokenizer, continuation, prompt)
    room = sequence_length - len(plan.tokens)  # inputs are the plan, sop and all targets but the last
    targets = (targets + [tokenizer.eop_id] if ends_document and len(targets) < room else targets)[:room]
    if not targets:
        return None
    return Sample(Context(plan.tokens + (tokenizer.sop_id,), None), tuple(targets))


def blank_sample(tokenizer: GLMTokenizer, text: str, blanks: list[tuple[int, int]], mask_name: str,
                 generate: int, sequence_length: int) -> Sample | None:
    """Blank out the character spans `blanks` (sorted) of `text` with `mask_name` and generate blank
    number `generate`, the earlier blanks spliced in as `fill_blanks` splices; None if it does not fit."""
    pieces = [text[a:b] for a, b in zip([0] + [e for _, e in blanks], [s for s, _ in blanks] + [len(text)])]
    try:
        plan = plan_prompt(tokenizer, mask_name.join(pieces), sequence_length)
    except ValueError:
        return None
    fills = [encode_blank(tokenizer, text[s:e], text[:s]) for s, e in blanks[:generate + 1]]
    mask_id = tokenizer.mask_ids[mask_name]
    sequence = list(plan.tokens)
    for fill in fills[:generate]:
        at = sequence.index(mask_id)
        sequence[at:at + 1] = fill
    targets = tuple(fills[generate]) + (tokenizer.eop_id,)
    if len(sequence) + len(targets) > sequence_length:
        return None
    return Sample(Context(tuple(sequence) + (tokenizer.sop_id,), sequence.index(mask_id)), targets)


def _window(corpus: Corpus, rng: np.random.Generator, num_tokens: int) -> tuple[str, bool]:
    """About `num_tokens` tokens of text starting at a line start; and whether they end their document."""
    offset = int(rng.integers(corpus.starts[-1] + len(corpus.texts[-1])))
    doc = bisect.bisect_right(corpus.starts, offset) - 1
    text = corpus.texts[doc]
    start = text.rfind("\n", 0, offset - corpus.starts[doc]) + 1
    end = min(len(text), start + max(1, round(num_tokens * corpus.chars_per_token[doc])))
    return text[start:end], end == len(text)


def _word_boundary(text: str, at: int, after_space: bool) -> int:
    """The start (or end) of the first whitespace run at or after `at`; the text's end if there is none."""
    match = re.compile(r"\s+").search(text, at)
    return len(text) if match is None else match.end() if after_space else match.start()


def _choose_blanks(text: str, rng: np.random.Generator, settings: ObjectiveSettings,
                   sentences: bool) -> list[tuple[int, int]]:
    units = [m.span() for m in (_SENTENCES if sentences else _WORDS).finditer(text)]
    if not units:
        return []
    count = min(settings.max_blanks, 1 + int(rng.poisson(settings.extra_blanks)))
    blanks: list[tuple[int, int]] = []
    for _ in range(4 * count):  # rejection sampling: blanks neither overlap nor touch ("[MASK][MASK]")
        if len(blanks) == count:
            break
        first = int(rng.integers(len(units)))
        length = 1 if sentences else 1 + int(rng.poisson(settings.mean_blank_words - 1))
        start, end = units[first][0], units[min(len(units), first + length) - 1][1]
        if all(end < s or start > e for s, e in blanks):
            blanks.append((start, end))
    return sorted(blanks)


def heldout_lm_samples(corpus: Corpus, tokenizer: GLMTokenizer, sequence_length: int, limit: int | None = None,
                       prompt_fraction: float = 0.125) -> list[Sample]:
    """[gMASK] samples tiling the held-out files in order: a prompt of 1/8 of each window (cut after a
    whitespace run), the rest generated and scored; windows are sized to fit a row, so few are truncated.
    With `limit`, that many windows spread evenly over all of them."""
    samples = []
    for text, chars_per_token in zip(corpus.texts, corpus.chars_per_token):
        size = max(1, round(0.85 * sequence_length * chars_per_token))
        for start in range(0, len(text), size):
            window = text[start:start + size]
            space = re.compile(r"\s+").search(window, int(prompt_fraction * len(window)))
            cut = space.end() if space else len(window)
            sample = gmask_sample(tokenizer, window[:cut], window[cut:], start + size >= len(text), sequence_length)
            if sample is not None:
                samples.append(sample)
    if limit is not None and limit < len(samples):
        samples = [samples[i * len(samples) // limit] for i in range(limit)]
    return samples


def random_gmask_sample(corpus: Corpus, tokenizer: GLMTokenizer, rng: np.random.Generator,
                        settings: ObjectiveSettings) -> Sample | None:
    """A [gMASK] sample from a random window: a prompt of random length, the rest generated."""
    text, ends = _window(corpus, rng, settings.sequence_length)
    cut = 0
    if rng.random() >= 0.05:  # 5 % of prompts are empty: generation from [gMASK] alone
        # Prompts end either after a word ("The value of") or after whitespace ("...:\n    ").
        at = int(rng.random() * settings.max_prompt_fraction * len(text))
        cut = _word_boundary(text, at, after_space=bool(rng.random() < 0.5))
    return gmask_sample(tokenizer, text[:cut], text[cut:], ends, settings.sequence_length)


def random_blank_sample(corpus: Corpus, tokenizer: GLMTokenizer, rng: np.random.Generator,
                        settings: ObjectiveSettings) -> Sample | None:
    """A [MASK] or [sMASK] sample from a random window of whole lines."""
    low, high = settings.blank_window
    text, _ = _window(corpus, rng, int(rng.integers(low, high + 1)))
    text = text[:text.rfind("\n")] if text.rfind("\n") > 0 else text  # whole lines
    sentences = bool(rng.random() < settings.smask_fraction)
    blanks = _choose_blanks(text, rng, settings, sentences)
    if not blanks:
        return None
    mask_name, generate = "[sMASK]" if sentences else "[MASK]", int(rng.integers(len(blanks)))
    return blank_sample(tokenizer, text, blanks, mask_name, generate, settings.sequence_length)


def _draw(make: Callable[[], Sample | None], tries: int = 50) -> Sample:
    for sample in (make() for _ in range(tries)):
        if sample is not None:
            return sample
    raise RuntimeError(f"no usable sample in {tries} tries: is the corpus empty or the sequence length tiny?")


def sample_layout(sample: Sample) -> tuple[torch.Tensor, ...]:
    """Ids (n,), positions (n,), attention (n, n) and labels (n,) of one sample, laid out as inference runs
    it: the prefill of its context, then one decode step per generated token fed back."""
    context = sample.context
    n, fed = len(context.tokens), len(sample.targets) - 1
    ids, positions, allowed, _ = prefill_inputs([context], "cpu")  # (1, n), (1, n), (1, 1, n, n)
    # Positions of the fed-back tokens: next_positions pins them or counts on, so two calls give them all.
    first, second = next_positions([context], 1), next_positions([context], 2)
    steps = first + torch.arange(fed) * (second - first)
    total = n + fed
    mask = torch.zeros(total, total, dtype=torch.bool)
    mask[:n, :n] = allowed[0, 0]
    # A decode step attends to its whole KV cache: the context and every token generated up to itself.
    index = torch.arange(total)
    mask[n:] = index[None, :] <= index[n:, None]
    labels = torch.full((total,), IGNORE, dtype=torch.long)
    labels[n - 1:] = torch.tensor(sample.targets)  # sop predicts the first target
    return (torch.cat([ids[0], torch.tensor(sample.targets[:-1], dtype=torch.long)]),
            torch.cat([positions[0], steps]), mask, labels)


def pack_rows(rows: list[list[Sample]], length: int, eop_id: int) -> Batch:
    """One batch; each row holds its samples side by side with block-diagonal attention, then padding."""
    b = len(rows)
    ids, positions = torch.zeros(b, length, dtype=torch.long), torch.zeros(b, length, dtype=torch.long)
    allowed = torch.zeros(b, 1, length, length, dtype=torch.bool)
    labels = torch.full((b, length), IGNORE, dtype=torch.long)
    used = 0
    for r, samples in enumerate(rows):
        at = 0
        for sample in samples:
            sample_ids, sample_positions, mask, sample_labels = sample_layout(sample)
            end = at + len(sample_ids)
            if end > length:
                raise ValueError(f"row {r} needs {end} positions; rows hold {length}")
            ids[r, at:end], positions[r, at:end], labels[r, at:end] = sample_ids, sample_positions, sample_labels
            allowed[r, 0, at:end, at:end] = mask
            at = end
        pad = torch.arange(at, length)
        allowed[r, 0, pad, pad] = True  # padding attends to itself only, so no attention row is empty
        used += at
    scored = (labels != IGNORE) & (labels != eop_id)
    return Batch(ids, positions, allowed, labels, scored, used)


def make_batch(corpus: Corpus, tokenizer: GLMTokenizer, settings: ObjectiveSettings, rows: int,
               seed: int, index: int) -> Batch:
    """Batch `index` of the training stream seeded by `seed` (a pure function of its arguments)."""
    rng = np.random.default_rng([seed, index])
    length = settings.sequence_length
    packed: list[list[Sample]] = []
    while len(packed) < rows:
        if rng.random() < settings.gmask_fraction:
            row = [_draw(lambda: random_gmask_sample(corpus, tokenizer, rng, settings))]
        else:  # blank samples until the next one does not fit (it is dropped)
            row = []
            while (sample := _draw(lambda: random_blank_sample(corpus, tokenizer, rng, settings))).num_inputs \
                    + sum(s.num_inputs for s in row) <= length:
                row.append(sample)
        if row:
            packed.append(row)
    return pack_rows(packed, length, tokenizer.eop_id)


class BatchStream(torch.utils.data.IterableDataset):
    """Batches start, start+1, ... of `make_batch`; under a DataLoader worker w of W makes every W-th one,
    and the DataLoader takes them round-robin: the same stream for any worker count. Each worker loads
    the tokenizer from its path (it does not pickle)."""

    def __init__(self, corpus: Corpus, tokenizer_path, settings: ObjectiveSettings, rows: int, seed: int,
                 start: int = 0):
        super().__init__()
        self.corpus, self.tokenizer_path, self.settings = corpus, tokenizer_path, settings
        self.rows, self.seed, self.start = rows, seed, start

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        tokenizer = GLMTokenizer.load(self.tokenizer_path)
        index = self.start + worker
        while True:
            yield make_batch(self.corpus, tokenizer, self.settings, self.rows, self.seed, index)
            index += workers
