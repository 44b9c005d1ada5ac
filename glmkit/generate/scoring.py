"""Scoring continuations: the log-probability a GLM gives a continuation after a context, in batched prefills.

This is GLM-130B's own evaluation (its evaluation/dataset.py, `build_multiple_choice_sample`):
  - a context holding `[MASK]` or `[sMASK]` has that blank filled by the continuation: `sop` and the
    continuation's positions are all pinned to the mask's position;
  - a context holding `[gMASK]` is continued after its last token: positions count on from it;
  - a context with no mask gets one appended: `[MASK]` by default, `[gMASK]` with `use_task_mask=True`
    (GLM-130B's task option of the same name; a mask the context holds is used whatever that option says);
  - the context attends both ways, the continuation causally after `sop`; GLM-130B's evaluation adds no
    `eos` after the text (`generate()` does when the mask is not at the end: `append_eos=True` does that);
  - `unidirectional=True` (GLM-130B's option; it needs `use_task_mask=True` and a context without masks, as
    GLM-130B asserts) reads `[gMASK] sop context continuation` left to right, every token causal, positions
    counting from 0.
GLM-130B's language-modelling task (its perplexity windows) is `score(Tokens(prompt), Tokens(text),
use_task_mask=True)`: the prompt and [gMASK] both ways, the text causally after sop; its first window (or
any window with `unidirectional`) has an empty prompt, which `score("", text, use_task_mask=True)` gives in
either mode: a text's log-likelihood on its own.
A continuation's log-probability is the sum over its tokens of the log-softmax over the tokenizer's real ids
(the padding rows of the vocabulary excluded, as `Generator.generate` excludes them with `num_ids`): the
numbers `generate(..., logprobs=True)` reports for the same tokens. `greedy` says every token was the argmax
over those ids (generate's greedy choice also skips the ids it bans: image ids and control pieces). The
blank's end (`eop`) is scored only with `include_end=True`.

Forms: `score("ctx", "cont")` gives one ContinuationScore; `score("ctx", ["A", "B"])` a list (the choices of
one context); `score(["c1", "c2"], ["a", ["b1", "b2"]])` one entry per context, a ContinuationScore or a list.
Text continuations are tokenized on their own, as GLM-130B tokenizes choices (SentencePiece's dummy prefix
makes "Paris" the word " Paris"; a leading space becomes a token of its own). Token ids, for a continuation
or a context, are given as `Tokens(ids)`, never as a bare list (which would read as a list of choices);
mask ids in a context's Tokens are its masks.

Computation: no token-by-token generation. All choices of a context share one row behind one copy of the
context, each choice a causal block that sees the context and itself only (GLM-130B packs choices with a
block mask the same way; a choice of one token needs no block: it is read where the context ends). Rows are left-padded
and batched up to `batch_tokens` tokens a forward pass, and the model projects onto the vocabulary only the
positions that predict a continuation token (`GLM.forward`'s `logits_at`).
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..tokenizer import check_encodable
from .blanks import check_masks

# Tokens (padding included) of one forward pass unless the caller says otherwise.
DEFAULT_BATCH_TOKENS = 4096
# Log-softmax runs over this many (target x vocabulary) fp32 entries at once (128 MiB).
LOGSOFTMAX_CHUNK_ELEMENTS = 1 << 25


@dataclass(frozen=True, init=False)
class Tokens:
    """Token ids given as they are (a continuation or a context), instead of text to tokenize."""

    ids: tuple[int, ...]

    def __init__(self, ids: Sequence[int]):
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise TypeError(f"Tokens takes a sequence of integer token ids, got {type(ids).__name__}")
        checked = []
        for index, token in enumerate(ids):
            if isinstance(token, bool):
                raise TypeError(f"Tokens: item {index} is a bool, not a token id")
            try:
                checked.append(operator.index(token))  # numpy and 0-d torch integers too; floats refused
            except TypeError:
                raise TypeError(f"Tokens: item {index} is {type(token).__name__}, not an integer token id") from None
        object.__setattr__(self, "ids", tuple(checked))

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class ContinuationScore:
    """A continuation's log-probability after its context, token by token, and whether greedy decoding gives it."""

    logprob: float
    greedy: bool
    tokens: tuple[int, ...]
    token_logprobs: tuple[float, ...]
    text: str = ""  # the continuation's text (decoded, when it was given as Tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_chars(self) -> int:
        return len(self.text)


@dataclass(frozen=True)
class ScoreItem:
    """One context as the model reads it, and the choices scored after it.

    `tokens` end with the token that predicts a choice's first token (sop; the context's last token when
    unidirectional); the first `bidirectional` of them attend each other both ways, the rest causally.
    """

    tokens: tuple[int, ...]
    bidirectional: int
    pinned_position: int | None  # every choice position ([MASK]/[sMASK]); None: positions count on
    choices: tuple[tuple[int, ...], ...]
    texts: tuple[str, ...]
    listed: bool  # the caller passed a list of choices (the result is a list)

    def positions(self) -> list[int]:
        """Position ids of `tokens`."""
        positions = list(range(len(self.tokens)))
        if self.pinned_position is not None:
            positions[-1] = self.pinned_position
        return positions


@dataclass(frozen=True)
class Row:
    """One batch row: an item's context once, then the blocks of some of its choices."""

    item: int
    choices: tuple[int, ...]
    length: int  # tokens of the row
    targets: int  # continuation tokens it scores


def _is_single(value) -> bool:
    return isinstance(value, (str, Tokens))


def _type_error(name: str, value) -> TypeError:
    hint = ": wrap token ids as glmkit.generate.scoring.Tokens(ids)" if isinstance(value, int) else ""
    return TypeError(f"{name} must be a string or Tokens(ids), got {type(value).__name__}{hint}")


def _context_ids(tokenizer, context, name: str) -> list[int]:
    if isinstance(context, Tokens):
        ids = list(context.ids)
        _check_ids(tokenizer, ids, name)
        names = {i: n for n, i in tokenizer.mask_ids.items()}
        kinds = {names[i] for i in ids if i in names}
        if len(kinds) > 1:
            raise ValueError(f"{name} mixes mask kinds {sorted(kinds)}: use one kind")
        return ids
    check_encodable(context, name)
    try:
        check_masks(context)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    return list(tokenizer.encode_with_masks(context))


def _check_ids(tokenizer, ids: list[int], name: str) -> None:
    for index, token in enumerate(ids):
        if not 0 <= token < tokenizer.num_tokens:
            raise ValueError(f"{name} holds id {token} at index {index}, outside the tokenizer's "
                             f"{tokenizer.num_tokens} ids (0..{tokenizer.num_tokens - 1})")


def _plan_context(tokenizer, context, name: str, unidirectional: bool, use_task_mask: bool,
                  append_eos: bool) -> tuple[tuple[int, ...], int, int | None, int]:
    """(tokens, bidirectional, pinned position, how many tokens GLM added) of one context (see ScoreItem)."""
    ids = _context_ids(tokenizer, context, name)
    given = len(ids)
    mask_ids = set(tokenizer.mask_ids.values())
    masks = [i for i, token in enumerate(ids) if token in mask_ids]
    if unidirectional:
        if masks:
            raise ValueError(f"{name} holds a mask, but unidirectional scoring fills no blank: it reads the "
                             f"context left to right after [gMASK] (GLM-130B refuses this too); remove the mask "
                             f"or pass unidirectional=False")
        return (tokenizer.gmask_id, tokenizer.sop_id, *ids), 1, None, 2
    if len(masks) > 1:
        raise ValueError(f"{name} holds {len(masks)} masks; a scored context has one blank, which the "
                         f"continuation fills: keep one [MASK], [sMASK] or [gMASK] (or none: one is appended)")
    if not masks:
        ids.append(tokenizer.gmask_id if use_task_mask else tokenizer.mask_id)
        masks = [len(ids) - 1]
    elif append_eos and masks[0] != len(ids) - 1:
        ids.append(tokenizer.eos_id)  # as generate() lays out a prompt whose mask is not at its end
    pinned = None if ids[masks[0]] == tokenizer.gmask_id else masks[0]
    return (*ids, tokenizer.sop_id), len(ids), pinned, len(ids) + 1 - given


def _check_length(name: str, choice_name: str, tokens: tuple[int, ...], added: int, ids: tuple[int, ...],
                  max_sequence_length: int) -> None:
    """ValueError saying how long a (context, continuation) is and what to cut, when the model cannot take it."""
    total = len(tokens) + len(ids) - 1  # the continuation's last token is predicted, never fed
    excess = total - max_sequence_length
    if excess <= 0:
        return
    if excess <= len(tokens) - added:
        fix = f"shorten the context by {excess} tokens (e.g. keep its end) or the continuation"
    else:
        fix = (f"the continuation alone is too long: at most {max_sequence_length - len(tokens) + 1} of its "
               f"tokens fit after this context ({max_sequence_length - added + 1} after an empty one): score it "
               f"in windows")
    raise ValueError(f"{name} and {choice_name} need {total} positions (the context's {len(tokens) - added} "
                     f"tokens, the {added} GLM adds, the continuation's {len(ids)} but its last); the model "
                     f"takes at most {max_sequence_length}: {fix}")


def _choice(tokenizer, continuation, name: str, include_end: bool) -> tuple[tuple[int, ...], str]:
    if isinstance(continuation, Tokens):
        ids = list(continuation.ids)
        _check_ids(tokenizer, ids, name)
        text = tokenizer.decode(ids)
    else:
        check_encodable(continuation, name)
        ids, text = list(tokenizer.encode(continuation)), continuation
    if not ids:
        what = "is empty" if not continuation else f"({continuation!r}) encodes to no tokens"
        raise ValueError(f"{name} {what}: a continuation needs at least one token")
    if include_end:
        ids.append(tokenizer.eop_id)
    return tuple(ids), text


def _choice_lists(contexts, continuations) -> tuple[list, list[tuple[list, bool, str]], bool]:
    """(contexts, per context (its continuations, given as a list, their name), single context)."""
    if _is_single(contexts):
        if _is_single(continuations):
            return [contexts], [([continuations], False, "continuations")], True
        if isinstance(continuations, int):
            raise _type_error("continuations", continuations)
        if not isinstance(continuations, (list, tuple)):
            raise TypeError(f"continuations must be a string, Tokens(ids) or a list of them, "
                            f"got {type(continuations).__name__}")
        for j, choice in enumerate(continuations):
            if isinstance(choice, (list, tuple)):
                raise TypeError(f"continuations[{j}] is a list: for one context pass its choices as one flat "
                                f"list, or pass a list of contexts")
        return [contexts], [(list(continuations), True, "continuations")], True
    if not isinstance(contexts, (list, tuple)):
        raise TypeError(f"contexts must be a string, Tokens(ids) or a list of them, got {type(contexts).__name__}")
    if not contexts:
        raise ValueError("no contexts given: pass a string or a non-empty list of them")
    if not isinstance(continuations, (list, tuple)):
        raise TypeError(f"with a list of contexts, continuations must be a list with one entry per context (a "
                        f"continuation or a list of choices), got {type(continuations).__name__}")
    if len(continuations) != len(contexts):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations: give one entry "
                         f"per context (a continuation or a list of choices)")
    lists = []
    for i, entry in enumerate(continuations):
        if isinstance(entry, (list, tuple)):
            lists.append((list(entry), True, f"continuations[{i}]"))
        else:
            lists.append(([entry], False, f"continuations[{i}]"))
    return list(contexts), lists, False


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def plan_rows(items: tuple[ScoreItem, ...], batch_tokens: int) -> list[Row]:
    """Each item's choices packed behind one copy of its context, a row at most `batch_tokens` long (and
    at most that many targets) unless one choice alone is longer."""
    rows = []
    for index, item in enumerate(items):
        chosen, length, targets = [], len(item.tokens), 0
        for j, choice in enumerate(item.choices):
            grown, more = length + len(choice) - 1, targets + len(choice)
            if chosen and max(grown, more) > batch_tokens:
                rows.append(Row(index, tuple(chosen), length, targets))
                chosen, grown, more = [], len(item.tokens) + len(choice) - 1, len(choice)
            chosen.append(j)
            length, targets = grown, more
        rows.append(Row(index, tuple(chosen), length, targets))
    return rows


def plan_batches(items: tuple[ScoreItem, ...], batch_tokens: int) -> list[list[Row]]:
    """The forward passes: rows longest first, as many a pass as fit `batch_tokens` once left-padded."""
    rows = sorted(plan_rows(items, batch_tokens), key=lambda r: -max(r.length, r.targets))
    batches: list[list[Row]] = []
    for row in rows:
        if batches and (len(batches[-1]) + 1) * max(batches[-1][0].length, batches[-1][0].targets) <= batch_tokens:
            batches[-1].append(row)
        else:
            batches.append([row])
    return batches


def batch_inputs(items: tuple[ScoreItem, ...], rows: list[Row], device) -> dict:
    """Model inputs of one pass (ids, positions, allowed, logits_at) and its targets: (b, ...) tensors."""
    length = max(r.length for r in rows)
    width = max(r.targets for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    positions = torch.zeros(len(rows), length, dtype=torch.long)
    blocks = torch.full((len(rows), length), -1, dtype=torch.long)  # -1 padding, 0 the context, k choice k
    at = torch.full((len(rows), width), length - 1, dtype=torch.long)
    targets = torch.zeros(len(rows), width, dtype=torch.long)
    shared_ends = torch.zeros(len(rows), dtype=torch.long)  # where each row's bidirectional part ends
    for r, row in enumerate(rows):
        item = items[row.item]
        pad, n = length - row.length, len(item.tokens)
        row_ids, row_positions, row_blocks = list(item.tokens), item.positions(), [0] * n
        row_at, row_targets = [], []
        for k, j in enumerate(row.choices, start=1):
            choice = item.choices[j]
            start = pad + len(row_ids)
            row_at += [pad + n - 1] + list(range(start, start + len(choice) - 1))
            row_targets += choice
            row_ids += choice[:-1]
            if item.pinned_position is not None:
                row_positions += [item.pinned_position] * (len(choice) - 1)
            else:
                row_positions += list(range(n, n + len(choice) - 1))
            row_blocks += [k] * (len(choice) - 1)
        ids[r, pad:] = torch.tensor(row_ids)
        positions[r, pad:] = torch.tensor(row_positions)
        blocks[r, pad:] = torch.tensor(row_blocks)
        at[r, :len(row_at)] = torch.tensor(row_at)
        targets[r, :len(row_targets)] = torch.tensor(row_targets)
        shared_ends[r] = pad + item.bidirectional
    device = torch.device(device)
    ids, positions, blocks, at, targets, shared_ends = (_to_device(t, device) for t in
                                                        (ids, positions, blocks, at, targets, shared_ends))
    # The (b, L, L) mask is made where the model runs: only the (b, L) block ids travel.
    query = torch.arange(length, device=device)[:, None]
    key = torch.arange(length, device=device)[None, :]
    key_block, query_block = blocks[:, None, :], blocks[:, :, None]  # (b, 1, L), (b, L, 1)
    # A key is visible in the context's bidirectional part, or causally within the context and the query's
    # own block: a choice sees the context and itself, never another choice.
    causal = (key <= query) & ((key_block == 0) | (key_block == query_block))
    allowed = (key_block >= 0) & ((key < shared_ends[:, None, None]) | causal)  # (b, L, L)
    return {"ids": ids, "positions": positions, "allowed": allowed[:, None], "at": at, "targets": targets}


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return tensor.to(device)
    # From pinned memory the copy is queued behind the pass still running instead of waiting for it.
    return tensor.pin_memory().to(device, non_blocking=True)


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, num_ids: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-softmax over the first `num_ids` ids at each target, and whether it is the argmax: (n,) each for
    logits (n, vocab) and targets (n,), in chunks so no (n, vocab) fp32 copy is made at once."""
    chunk = max(1, LOGSOFTMAX_CHUNK_ELEMENTS // num_ids)
    values, best = [], []
    for i in range(0, logits.shape[0], chunk):
        log_probs = logits[i:i + chunk, :num_ids].float().log_softmax(dim=-1)  # (c, num_ids)
        chosen = log_probs.gather(1, targets[i:i + chunk, None])[:, 0]
        values.append(chosen)
        best.append(chosen >= log_probs.max(dim=-1).values)
    return torch.cat(values), torch.cat(best)


@dataclass(frozen=True)
class ScoreRequest:
    """Score continuations after contexts (the module docstring gives the rules), validated and tokenized."""

    items: tuple[ScoreItem, ...]
    num_ids: int  # the tokenizer's ids: the log-softmax covers these
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    single: bool = False  # the caller passed one context and gets its entry back, not a list
    reduction: ClassVar[str] = "rank0"

    @classmethod
    def build(cls, tokenizer, max_sequence_length: int, contexts, continuations, *, unidirectional: bool = False,
              use_task_mask: bool = False, append_eos: bool = False, include_end: bool = False,
              batch_tokens: int = DEFAULT_BATCH_TOKENS) -> "ScoreRequest":
        """Validate and tokenize a score() call before any compute; errors name the parameter."""
        for name, value in (("unidirectional", unidirectional), ("use_task_mask", use_task_mask),
                            ("append_eos", append_eos), ("include_end", include_end)):
            _check_flag(name, value)
        if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
            raise ValueError(f"batch_tokens must be a positive number of tokens a forward pass, got {batch_tokens!r}")
        if unidirectional and not use_task_mask:
            raise ValueError("unidirectional=True needs use_task_mask=True: unidirectional scoring reads the text "
                             "after [gMASK] (GLM-130B: '[MASK] doesn't support unidirectional attention')")
        context_list, choice_lists, single = _choice_lists(contexts, continuations)
        items = []
        for i, (context, (choices, listed, choices_name)) in enumerate(zip(context_list, choice_lists)):
            name = "contexts" if single else f"contexts[{i}]"
            if not _is_single(context):
                raise _type_error(name, context)
            if not choices:
                raise ValueError(f"{choices_name} is an empty list of choices: give at least one continuation")
            tokens, bidirectional, pinned, added = _plan_context(tokenizer, context, name, unidirectional,
                                                                 use_task_mask, append_eos)
            planned = []
            for j, choice in enumerate(choices):
                choice_name = f"{choices_name}[{j}]" if listed else choices_name
                if not _is_single(choice):
                    raise _type_error(choice_name, choice)
                ids, text = _choice(tokenizer, choice, choice_name, include_end)
                _check_length(name, choice_name, tokens, added, ids, max_sequence_length)
                planned.append((ids, text))
            items.append(ScoreItem(tokens, bidirectional, pinned, tuple(ids for ids, _ in planned),
                                   tuple(text for _, text in planned), listed))
        return cls(tuple(items), tokenizer.num_tokens, batch_tokens, single)

    @property
    def batches(self) -> list[list[Row]]:
        """The forward passes this request makes, each a list of rows."""
        return plan_batches(self.items, self.batch_tokens)

    @torch.inference_mode()
    def run(self, shard, channel):
        """The ContinuationScores in the caller's form; every rank runs the same passes (TP collectives)."""
        model, device = shard.generator.model, shard.generator.device
        batches, outputs = self.batches, []
        for number, rows in enumerate(batches):
            if channel.should_abort():  # every rank of a cluster reads rank 0's verdict here
                raise RuntimeError(f"scoring stopped after {number} of {len(batches)} forward passes: a stop "
                                   f"was requested")
            inputs = batch_inputs(self.items, rows, device)
            logits = model(inputs["ids"], inputs["positions"], inputs["allowed"], logits_at=inputs["at"])  # (b, k, V)
            values, best = target_logprobs(logits.flatten(0, 1), inputs["targets"].flatten(), self.num_ids)
            # Read on the host after the last pass, so the host prepares pass i + 1 while the device runs pass i.
            outputs.append((rows, values.view(len(rows), -1), best.view(len(rows), -1)))
            del logits
        scores: dict[tuple[int, int], ContinuationScore] = {}
        for rows, values, best in outputs:
            values, best = values.tolist(), best.tolist()
            for r, row in enumerate(rows):
                item, offset = self.items[row.item], 0
                for j in row.choices:
                    n = len(item.choices[j])
                    token_logprobs = tuple(values[r][offset:offset + n])
                    scores[row.item, j] = ContinuationScore(sum(token_logprobs), all(best[r][offset:offset + n]),
                                                            item.choices[j], token_logprobs, item.texts[j])
                    offset += n
        entries = [[scores[i, j] for j in range(len(item.choices))] if item.listed else scores[i, 0]
                   for i, item in enumerate(self.items)]
        return entries[0] if self.single else entries
