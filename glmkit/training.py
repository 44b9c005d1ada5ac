"""GLM-130B's blank-infilling objective for small GLMs: samples, packed batches, loss, evaluation, training loop.

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
import contextlib
import math
import re
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .generation import Context, next_positions, prefill_inputs
from .infilling import plan_prompt
from .model import GLM
from .tokenizer import GLMTokenizer

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


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def token_nll(model: GLM, batch: Batch) -> torch.Tensor:
    """Negative log-likelihood of each label, (b, s) fp32; 0 where the label is IGNORE."""
    logits = model(batch.input_ids, batch.position_ids, batch.allowed)  # (b, s, vocab)
    b, s, vocab = logits.shape
    return F.cross_entropy(logits.reshape(b * s, vocab).float(), batch.labels.reshape(b * s),
                           ignore_index=IGNORE, reduction="none").view(b, s)


@dataclass(frozen=True)
class EvalResult:
    """Mean NLL over all targets (text and eop) and over text targets only; perplexity of the latter."""

    loss: float
    text_loss: float
    num_text: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.text_loss)


@torch.no_grad()
def evaluate(model: GLM, batches: Iterable[Batch], device) -> EvalResult:
    """Loss of `model` on fixed batches (train mode is restored afterwards)."""
    device, was_training = torch.device(device), model.training
    model.eval()
    total = text = 0.0
    num_targets = num_text = 0
    for batch in batches:
        batch = batch.to(device)
        with autocast_for(device):
            nll = token_nll(model, batch).double()
        total, text = total + float(nll.sum()), text + float(nll[batch.scored].sum())
        num_targets += int((batch.labels != IGNORE).sum())
        num_text += int(batch.scored.sum())
    model.train(was_training)
    if not num_text:
        raise ValueError("no text targets to evaluate")
    return EvalResult(total / num_targets, text / num_text, num_text)


def unigram_log_probs(counts: dict[int, int], support: range) -> torch.Tensor:
    """Add-one smoothed unigram, log p(t) = log((count(t) + 1) / (total + |support|)) for t in `support`
    (the ids text can produce), -inf below it; (support.stop,) float64."""
    if any(t not in support for t in counts):
        raise ValueError(f"counted ids outside the support {support}")
    table = torch.full((support.stop,), float("-inf"), dtype=torch.float64)
    table[support.start:] = torch.tensor([counts.get(t, 0) + 1.0 for t in support], dtype=torch.float64).log()
    return table - math.log(sum(counts.values()) + len(support))


def perplexity(log_probs: torch.Tensor, tokens) -> float:
    """exp(mean negative log-probability) of `tokens` under a unigram table."""
    return math.exp(-float(log_probs[torch.as_tensor(tokens, dtype=torch.long).flatten()].mean()))


def scored_tokens(batches: Iterable[Batch]) -> torch.Tensor:
    """The text target ids of fixed batches (those `evaluate` counts), flattened."""
    return torch.cat([batch.labels[batch.scored] for batch in batches])


@dataclass(frozen=True)
class TrainSettings:
    """AdamW with linear warmup and cosine decay, gradient clipping, a step count or a time budget."""

    learning_rate: float = 2e-3
    min_learning_rate: float = 2e-4
    warmup_steps: int = 200
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    steps: int | None = None  # total optimizer steps; None: as many as fit in time_budget_s
    time_budget_s: float | None = None
    calibration_steps: int = 60  # steps timed (after 10 untimed ones) before `steps` is fixed from the budget
    num_evals: int = 20  # evaluations over the run, plus one before the first step
    log_every: int = 25

    def __post_init__(self):
        if (self.steps is None) == (self.time_budget_s is None):
            raise ValueError("give exactly one of steps and time_budget_s")
        if self.steps is None and self.calibration_steps > self.warmup_steps:  # warmup must not depend on it
            raise ValueError("calibration_steps must not exceed warmup_steps: the schedule is fixed after them")


def learning_rate(step: int, total: int, settings: TrainSettings) -> float:
    """Linear warmup to the peak, then cosine decay to the minimum at `total`."""
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    progress = min(1.0, (step - settings.warmup_steps) / max(1, total - settings.warmup_steps))
    spread = settings.learning_rate - settings.min_learning_rate
    return settings.min_learning_rate + 0.5 * spread * (1 + math.cos(math.pi * progress))


def init_weights(model: GLM, seed: int, std: float = 0.02) -> None:
    """Normal(0, std) weights drawn on the CPU from one seeded generator (same on every device), DeepNorm's
    beta = (8 N)^(-1/4) on the value, attention-output and MLP weights; zero biases, unit LayerNorms."""
    generator = torch.Generator().manual_seed(seed)
    beta = (8 * model.config.num_layers) ** -0.25
    heads, head_dim, hidden = model.config.num_attention_heads, model.config.head_dim, model.config.hidden_size
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                weight = torch.empty(param.shape).normal_(0.0, std, generator=generator)
                if name.endswith(("attention.dense.weight", "dense_h_to_4h.weight", "dense_4h_to_h.weight")):
                    weight *= beta
                elif name.endswith("query_key_value.weight"):
                    weight.view(heads, 3, head_dim, hidden)[:, 2] *= beta  # per head [q, k, v] rows
                param.copy_(weight)


def train(model: GLM, batches: Iterator[Batch], settings: TrainSettings, device,
          evaluate_fn: Callable[[], dict] | None = None,
          on_record: Callable[[dict], None] | None = None) -> list[dict]:
    """Train `model` in place on `batches`; return the log (a record per log step, eval metrics merged in).

    With a time budget, steps from 10 to 10 + calibration_steps (or to a tenth of the budget) are timed and the
    step count is fixed so that training and its evaluations (timed at step 0) fit the budget; the record
    "planned_steps" gives it (pass it as `steps` to repeat the run)."""
    device = torch.device(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # weight decay on matrices and embeddings only
    groups = [{"params": decay, "weight_decay": settings.weight_decay},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate, betas=settings.betas,
                                  fused=True if device.type == "cuda" else None)
    params = list(model.parameters())
    log: list[dict] = []
    started, total, eval_seconds = time.perf_counter(), settings.steps, 0.0
    eval_every = max(1, (total or 1) // settings.num_evals)

    def clock() -> float:  # seconds since the start, once the GPU has finished what was queued
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    def emit(record: dict) -> None:
        record["elapsed_s"] = clock()
        log.append(record)
        if on_record is not None:
            on_record(record)

    def run_eval() -> dict:
        nonlocal eval_seconds
        t0 = clock()
        metrics = evaluate_fn()
        eval_seconds = clock() - t0
        return metrics

    if evaluate_fn is not None:
        emit({"step": 0, **run_eval()})
    model.train()
    running_loss = torch.zeros((), device=device)
    running_steps = running_tokens = step = 0
    window_start = timed_start = clock()
    while total is None or step < total:
        batch = next(batches).to(device, non_blocking=True)
        lr = learning_rate(step, total or settings.warmup_steps, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast_for(device):
            nll = token_nll(model, batch)
        loss = nll.sum() / (batch.labels != IGNORE).sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        optimizer.step()
        step += 1
        running_loss += loss.detach()
        running_steps, running_tokens = running_steps + 1, running_tokens + batch.num_tokens
        if total is None and step == 10:  # the first steps pay for warm-up (allocator, workers, kernels)
            timed_start = clock()
        elif total is None and (step == 10 + settings.calibration_steps
                                or step > 10 and clock() > 0.1 * settings.time_budget_s):  # slow devices
            rate = (step - 10) / (clock() - timed_start)
            left = settings.time_budget_s - clock() - settings.num_evals * eval_seconds
            total = step + max(1, int(left * rate))
            eval_every = max(1, total // settings.num_evals)
            emit({"step": step, "planned_steps": total, "steps_per_s": rate})
        is_last = step == total
        wants_eval = evaluate_fn is not None and total is not None and (step % eval_every == 0 or is_last)
        if step % settings.log_every == 0 or wants_eval:
            now = clock()
            record = {"step": step, "train_loss": float(running_loss) / running_steps, "lr": lr,
                      "tokens_per_s": running_tokens / (now - window_start)}
            emit({**record, **(run_eval() if wants_eval else {})})
            running_loss.zero_()
            running_steps = running_tokens = 0
            window_start = clock()
    return log
