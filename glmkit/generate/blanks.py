"""Text-level GLM-130B blank filling over a `tokens.Generator`, as the original generate.py does it.

Rules (GLM-130B's generate.py): a prompt without a mask gets `[gMASK]` appended; unless the prompt ends
with a mask, `eos` follows the text; `sop` starts each generation. Masks are filled left to right, each
generation spliced into the sequence before the next mask is filled. Unlike the original, which
silently fills only the first kind it finds, mixing mask kinds in one prompt is an error; and unlike it,
a blank's text never holds an id that is not text (a mask, sop, an image id): the original fills any
mask it finds, generated ones too, so a sampled mask starts another round and a call can run forever.
Here only the prompt's masks are blanks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..tokenizer import MASK_PATTERN, NUM_IMAGE_TOKENS, check_encodable
from .sampling import GenerationSettings
from .tokens import Context, Generator, TokenLogprob

# Bracketed look-alikes such as "[mask]", "[ MASK ]", "[xMASK]" or an unclosed "[MASK".
_MASK_LOOKALIKE = re.compile(r"\[[^\[\]\n]{0,6}mask[^\[\]\n]{0,6}\]|\[[sg]?MASK(?!\])", re.IGNORECASE)


@dataclass
class Blank:
    """One filled mask: its text, its span in the result text, tokens and why generation stopped."""

    text: str
    start: int
    end: int
    tokens: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None


@dataclass
class GenerationResult:
    """A prompt with every blank filled; `text[b.start:b.end] == b.text` for each blank."""

    prompt: str
    text: str
    blanks: list[Blank] = field(default_factory=list)
    num_prompt_tokens: int = 0
    unfilled_blanks: int = 0  # masks left in `text` because the call was aborted before they started

    @property
    def completion(self) -> str:
        """The generated text alone (blanks joined)."""
        return "".join(b.text for b in self.blanks)

    @property
    def finish_reason(self) -> str:
        """Why generation ended: the last blank's reason, or "abort" when an abort left masks unfilled."""
        if self.unfilled_blanks:
            return "abort"
        return self.blanks[-1].finish_reason if self.blanks else "length"

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(b.tokens) for b in self.blanks)


@dataclass(frozen=True)
class TextEvent:
    """A streamed piece of generated text for prompt `index`, blank `blank`."""

    index: int
    blank: int
    token: int
    text: str
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class PromptPlan:
    """A prompt's GLM token sequence and which mask generation fills."""

    prompt: str
    tokens: tuple[int, ...]
    mask_name: str
    appended_gmask: bool

    @property
    def uses_gmask(self) -> bool:
        return self.mask_name == "[gMASK]"


def check_masks(prompt: str) -> list[str]:
    """The mask names in `prompt`, in order; ValueError for malformed or mixed masks."""
    valid = {m.start(): m.group() for m in MASK_PATTERN.finditer(prompt)}
    for match in _MASK_LOOKALIKE.finditer(prompt):
        if valid.get(match.start()) != match.group():
            raise ValueError(f"malformed mask {match.group()!r} at character {match.start()} of the prompt: "
                             f"write [MASK], [sMASK] or [gMASK] exactly")
    kinds = list(valid.values())
    if len(set(kinds)) > 1:
        raise ValueError(f"prompt mixes mask kinds {sorted(set(kinds))}: GLM-130B fills one kind per "
                         f"prompt, so use only [MASK] (short spans), [sMASK] (sentences) or [gMASK] "
                         f"(a long continuation at the end)")
    return kinds


def plan_prompt(tokenizer, prompt: str, max_sequence_length: int) -> PromptPlan:
    """Tokenize a prompt the way GLM-130B's generate.py does, validating it first."""
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a string, got {type(prompt).__name__}")
    check_encodable(prompt, "the prompt")
    kinds = check_masks(prompt)
    tokens = list(tokenizer.encode_with_masks(prompt))
    appended = not kinds
    if appended:
        tokens.append(tokenizer.gmask_id)
    mask_name = kinds[0] if kinds else "[gMASK]"
    if not appended and not prompt.endswith(kinds[-1]):
        tokens.append(tokenizer.eos_id)
    # The context plus sop must fit; generation then stops at the model's maximum length.
    if len(tokens) + 1 > max_sequence_length:
        raise ValueError(f"prompt is {len(tokens) + 1} tokens long with the mask/eos/sop tokens GLM adds; "
                         f"the model takes at most {max_sequence_length}: shorten the prompt")
    return PromptPlan(prompt, tuple(tokens), mask_name, appended)


def check_callbacks(on_text=None, should_abort=None) -> None:
    """TypeError naming a generate call's callback that is not callable (GLMPipeline and GLMCluster alike)."""
    for name, callback in (("on_text", on_text), ("should_abort", should_abort)):
        if callback is not None and not callable(callback):
            raise TypeError(f"{name} must be a function (or None), got {type(callback).__name__}")


def check_prompts(prompts) -> list[str]:
    """The batch of a generate call's `prompts` (a string or a list of them); TypeError/ValueError naming them."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("no prompts given: pass a string or a non-empty list of strings")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{index}] must be a string, got {type(prompt).__name__}")
    return list(prompts)


def _leading_space(tokenizer, tokens: list[int], before: str) -> str:
    # SentencePiece drops the word-boundary marker of the first piece when decoding; put the space
    # back when the generated text starts a new word after a non-space character.
    if tokens and before and not before[-1].isspace() and tokenizer.id_to_piece(tokens[0]).startswith("\u2581"):
        return " "
    return ""


def _earliest_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


class _BlankDecoder:
    """One blank's text, decoded incrementally as tokens arrive; cuts at stop strings and holds back what
    may become one.

    Decoding the whole blank at every token would cost quadratic time in its length. The text of a window
    of the last few tokens is decoded instead and the new characters appended, only once they are final:
    a window that ends inside a multi-byte character (byte pieces) waits for the rest.
    """

    def __init__(self, tokenizer, before: str, stops: tuple[str, ...]):
        self.tokenizer, self.before, self.stops = tokenizer, before, stops
        self.decoded = ""  # text of tokens[:self.read]
        self.prefix = self.read = 0  # the window is tokens[prefix:read] (already in `decoded`) + the new ones
        self.emitted = 0
        self.stop_at: int | None = None  # where the earliest stop string starts in `decoded`

    def text(self, tokens: list[int]) -> str:
        """The whole text of `tokens` as one decode (exact; used once a blank is done)."""
        return _leading_space(self.tokenizer, tokens, self.before) + self.tokenizer.decode(tokens)

    def push(self, tokens: list[int]) -> None:
        """Take `tokens` (the blank so far: earlier ones plus new ones) into the decoded text."""
        if self.read == 0 and tokens:
            self.decoded = _leading_space(self.tokenizer, tokens, self.before)
        seen = self.tokenizer.decode(tokens[self.prefix:self.read])
        window = self.tokenizer.decode(tokens[self.prefix:])
        if len(window) <= len(seen) or window.endswith("\ufffd") or not window.startswith(seen):
            if not window.startswith(seen):  # the window re-read its start differently: decode it all again
                # The next window starts one token back: a window's first piece loses its leading space.
                self.decoded, self.prefix, self.read = self.text(tokens), len(tokens) - 1, len(tokens)
                if self.stops:
                    self.stop_at = _earliest_stop(self.decoded, self.stops)
            return
        searched_from = max(0, len(self.decoded) - max((len(s) for s in self.stops), default=0) + 1)
        self.decoded += window[len(seen):]
        self.prefix, self.read = self.read, len(tokens)
        if self.stops and self.stop_at is None:
            self.stop_at = _earliest_stop(self.decoded, self.stops, searched_from)

    def visible(self, text: str, final: bool) -> str:
        cut = _earliest_stop(text, self.stops)
        if cut is not None:
            return text[:cut]
        if final:
            return text
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        text = text[:len(text) - hold]
        return text.rstrip("\ufffd")  # an unfinished multi-byte character

    def delta(self, tokens: list[int]) -> str:
        """Push `tokens` and return the newly visible text."""
        self.push(tokens)
        shown = self.decoded[:self.stop_at] if self.stop_at is not None else self.visible(self.decoded, False)
        piece = shown[self.emitted:]
        self.emitted = max(self.emitted, len(shown))
        return piece

    def hits_stop(self, tokens: list[int], pushed: list[int] | None) -> bool:
        """Whether `tokens` contain a stop string: from the incremental text when `tokens` are what was
        pushed last (greedy and sampled decoding), else by decoding them (beam search's candidates)."""
        if not self.stops:
            return False
        if pushed is not None and len(pushed) == len(tokens) and pushed[-1:] == tokens[-1:]:
            return self.stop_at is not None
        return _earliest_stop(self.text(tokens), self.stops) is not None


def _tokens_within(decoder: _BlankDecoder, tokens: list[int], text: str) -> list[int]:
    """The longest token prefix whose text fits inside `text` (what a stop-cut blank splices back)."""
    kept = 0
    while kept < len(tokens) and text.startswith(decoder.text(tokens[:kept + 1])):
        kept += 1
    return tokens[:kept]


def non_text_ids(tokenizer) -> torch.Tensor:
    """Ids a blank never holds (banned in every strategy): image ids and control pieces, except eop and eos,
    which end a blank."""
    end_tokens = (tokenizer.eop_id, tokenizer.eos_id)
    controls = [i for i in tokenizer.control_ids if i not in end_tokens]
    return torch.cat([torch.arange(NUM_IMAGE_TOKENS), torch.tensor(controls, dtype=torch.long)])


def fill_blanks(generator: Generator, tokenizer, plans: tuple[PromptPlan, ...], settings: GenerationSettings,
                on_text: Callable[[TextEvent], None] | None = None,
                should_abort: Callable[[], bool] | None = None) -> list[GenerationResult]:
    """Fill every blank of every planned prompt (`plan_prompt`); prompts are batched for each round of blanks."""
    sequences = [list(plan.tokens) for plan in plans]
    pieces = [MASK_PATTERN.split(plan.prompt) for plan in plans]  # text around the masks
    results = [GenerationResult(plan.prompt, pieces[i][0], num_prompt_tokens=len(plan.tokens) + 1)
               for i, plan in enumerate(plans)]
    mask_ids = [tokenizer.mask_ids[plan.mask_name] for plan in plans]
    end_tokens = (tokenizer.eop_id, tokenizer.eos_id)
    # Only the prompt's own masks are blanks; what is generated is text (see the module docstring).
    blank_counts = [plan.tokens.count(mask_id) for plan, mask_id in zip(plans, mask_ids)]
    banned = non_text_ids(tokenizer)
    round_number = 0
    while True:
        pending = [i for i, result in enumerate(results) if len(result.blanks) < blank_counts[i]]
        if not pending or (should_abort is not None and should_abort()):
            break
        decoders, contexts = {}, []
        for i in pending:
            position = sequences[i].index(mask_ids[i])
            pinned = None if plans[i].uses_gmask else position
            contexts.append(Context(tuple(sequences[i]) + (tokenizer.sop_id,), pinned))
            decoders[i] = _BlankDecoder(tokenizer, results[i].text, settings.stop)

        def stop(row: int, tokens: list[int]) -> bool:
            return decoders[pending[row]].hits_stop(tokens, generated.get(pending[row]))

        def forward_token(row: int, token: int, record) -> None:
            index = pending[row]
            tokens = generated.setdefault(index, [])
            tokens.append(token)
            piece = decoders[index].delta(tokens)  # also what `stop` reads: it runs right after this
            if on_text is not None and piece:
                on_text(TextEvent(index, round_number, token, piece, record))

        generated: dict[int, list[int]] = {}
        outputs = generator.generate(contexts, settings, end_tokens, stop=stop, on_token=forward_token,
                                     should_abort=should_abort, num_ids=tokenizer.num_tokens, banned_ids=banned,
                                     blank=round_number)
        for i, output in zip(pending, outputs):
            decoder = decoders[i]
            text = decoder.visible(decoder.text(output.tokens), final=True)
            spliced = output.tokens
            if output.finish_reason == "stop":
                spliced = _tokens_within(decoder, output.tokens, text)
            result = results[i]
            start = len(result.text)
            result.text += text
            result.blanks.append(Blank(text, start, start + len(text), output.tokens,
                                       output.finish_reason, output.logprobs))
            piece_index = len(result.blanks)
            if piece_index < len(pieces[i]):
                result.text += pieces[i][piece_index]
            position = sequences[i].index(mask_ids[i])
            sequences[i] = sequences[i][:position] + spliced + sequences[i][position + 1:]
        round_number += 1
    for i, result in enumerate(results):  # blanks left unfilled by an abort keep their masks
        result.unfilled_blanks = blank_counts[i] - len(result.blanks)
        for k in range(len(result.blanks) + 1, len(pieces[i])):
            result.text += plans[i].mask_name + pieces[i][k]
    return results
