"""lm-evaluation-harness's model interface over a glmkit backend (a GLMPipeline or a GLMCluster).

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from glmkit.evaluation.lm_eval_model import GLMKitLM

    results = simple_evaluate(model=GLMKitLM(pipeline), tasks=["my_task"],
                              task_manager=TaskManager(include_path="configs/tasks/lm-eval"))

Importing this module registers the class as lm-eval's model "glmkit", so `simple_evaluate(model="glmkit",
model_args="pretrained=glm-tiny")` loads a GLMPipeline from a glmkit config (lm-eval's own command line never
imports glmkit, so there the name is unknown). Needs the optional extra: `pip install 'glmkit[lm-eval]'`.
lm-eval reads a local task's data with the datasets library; on a machine without network set
HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 before importing lm_eval (datasets reads them at import; glmkit
sets no environment variables itself).

How GLM answers lm-eval's three questions (the GLM-130B conventions of glmkit.generate.scoring):
- `loglikelihood(context, continuation)`: the context attends both ways; the continuation is read causally
  after `sop` (GLM-130B's multiple-choice evaluation; the model arguments `unidirectional` and
  `use_task_mask` pass through to score). Requests that share a context (the choices of one question) are
  scored in one row behind one copy of it. Two readings, by whether the context holds a GLM mask:
    * no mask: the continuation continues the text, lm-eval's own reading. `[MASK] sop` follows the context;
      as lm-eval's models do, trailing whitespace of the context moves to the continuation, which is
      tokenized as text that follows (no SentencePiece dummy prefix): " Paris" is the word "Paris", the very
      tokens GLM-130B gives a choice "Paris" on its own.
    * one `[MASK]`, `[sMASK]` or `[gMASK]` (a task written in GLM-130B's convention, target_delimiter ""):
      the continuation fills that blank, tokenized on its own as GLM-130B tokenizes a choice; this is what
      glmkit's own evaluator scores for the same item.
- `loglikelihood_rolling(text)`: perplexity the way GLM-130B computes a language-modelling loss
  unidirectionally: `[gMASK] sop` and then the text, every token causal (GLM-130B allows unidirectional
  attention only after `[gMASK]`; it is the one GLM reading in which each token is predicted from the tokens
  before it alone, as perplexity requires). The text is plain text (mask names in it are text). A text longer
  than the model is cut into lm-eval's rolling windows (`rolling_windows`): every token is predicted once,
  each window from as much preceding text as fits.
- `generate_until(context, gen_kwargs)`: glmkit's generate() of the context: `[gMASK]` is appended (GLM's
  left-to-right continuation) unless the context holds a mask, whose blank is then filled; `until` are stop
  strings (the text before the first one is returned), `max_gen_toks` is max_new_tokens, the other keywords
  are generate()'s settings (do_sample, temperature, top_k, ...); greedy unless they say otherwise.

Every request of a call is validated and tokenized before the model runs; a bad one fails naming its index,
task and document. A context too long for the model is an error unless `truncation=True`, which keeps its end
(as lm-eval's Hugging Face model does) as long as the mask it may hold survives.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

try:
    import lm_eval.models  # noqa: F401 - lm-eval fills its registry lazily only while it is empty: fill it first
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("glmkit.evaluation.lm_eval_model needs lm-evaluation-harness 0.4: "
                      "pip install 'glmkit[lm-eval]'") from error
from tqdm.auto import tqdm

from ..generate.blanks import check_masks
from ..generate.scoring import DEFAULT_BATCH_TOKENS, ScoreRequest, Tokens
from ..tokenizer import MASK_PATTERN

DEFAULT_BATCH_SIZE = 32  # contexts a score call (prompts a generate call); score batches its passes by tokens
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default for generate_until
# A scored context and continuation take this many positions more than their own tokens: the mask and sop
# GLM adds ([MASK] sop after a context, [gMASK] sop before a unidirectional one), less the last continuation
# token, which is predicted but never read.
SCORE_OVERHEAD = 1


def rolling_windows(ids: Sequence[int], max_sequence_length: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(context, continuation) token windows covering `ids`, each continuation token once, for unidirectional
    scoring after `[gMASK] sop`: lm-eval's rolling windows, so that each fits the model.

    lm-eval's windows (lm_eval.utils.get_rolling_token_windows with a context of one token) are laid out for a
    model that reads one prefix token before the first window; GLM reads two (`[gMASK] sop`), so the window
    is one token shorter than the model: context + continuation + SCORE_OVERHEAD <= max_sequence_length.
    """
    if max_sequence_length < 3:
        raise ValueError(f"max_sequence_length must be at least 3 for rolling windows, got {max_sequence_length}")
    windows = []
    pairs = get_rolling_token_windows(token_list=list(ids), prefix_token=None,
                                      max_seq_len=max_sequence_length - 2, context_len=1)
    for number, (context, continuation) in enumerate(map(make_disjoint_window, pairs)):
        # The first window's context is lm-eval's prefix token alone: here it is [gMASK] sop, which score adds.
        windows.append((() if number == 0 else tuple(context), tuple(continuation)))
    return windows


def _describe(index: int, request) -> str:
    task, doc = getattr(request, "task_name", None), getattr(request, "doc_id", None)
    where = f" (task {task!r}, doc {doc})" if task is not None else ""
    return f"request {index}{where}"


def _check_args(index: int, request, kinds: tuple[type, ...], names: str) -> tuple:
    args = request.args
    if len(args) != len(kinds) or not all(isinstance(a, k) for a, k in zip(args, kinds)):
        got = ", ".join(type(a).__name__ for a in args)
        raise TypeError(f"{_describe(index, request)}: lm-eval passes {names}, got ({got})")
    return args


def _positive_int(name: str, value, allow_auto: bool = False) -> int | None:
    if allow_auto and isinstance(value, str) and value.split(":")[0] == "auto":
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        auto = " or 'auto'" if allow_auto else ""
        raise ValueError(f"{name} must be a positive integer{auto}, got {value!r}")
    return value


def _flag(name: str, value) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _masks(index: int, request, context: str) -> list[str]:
    """The GLM mask names of a context, checked as glmkit's generate() and score() check a prompt: a
    malformed mask or a look-alike ("[mask]"), or mixed kinds, fail naming the request."""
    try:
        return check_masks(context)
    except ValueError as error:
        raise ValueError(f"{_describe(index, request)}: {error}") from None


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


@register_model("glmkit")
class GLMKitLM(LM):
    """lm-eval's LM over a glmkit backend: `GLMKitLM(pipeline_or_cluster)` or `GLMKitLM(pretrained="glm-tiny")`.

    `batch_size`: contexts per score call and prompts per generate call ("auto" takes the default, 32, or
    `max_batch_size` when smaller: no probing is needed); the choices of one context always go together, and
    score packs each call's forward passes by `batch_tokens`.
    `max_gen_toks`: max_new_tokens of generate_until when a task gives none. `unidirectional`,
    `use_task_mask`: score's options for loglikelihood (default: GLM-130B's multiple-choice reading).
    `truncation`: keep the end of a context too long for the model instead of raising. `device`, `dtype`:
    overrides of the config named by `pretrained`. `progress`: show progress bars.
    """

    def __init__(self, backend=None, *, pretrained: str | Path | None = None, batch_size: int | str | None = None,
                 max_batch_size: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 batch_tokens: int = DEFAULT_BATCH_TOKENS, unidirectional: bool = False,
                 use_task_mask: bool = False, truncation: bool = False, device: str | None = None,
                 dtype: str | None = None, progress: bool = True):
        super().__init__()
        if (backend is None) == (pretrained is None):
            raise ValueError("GLMKitLM needs a backend (a GLMPipeline or GLMCluster) or pretrained=<glmkit config "
                             "name or path>, not both and not neither")
        size = DEFAULT_BATCH_SIZE if batch_size is None else _positive_int("batch_size", batch_size, allow_auto=True)
        if size is None:  # "auto": lm-eval's probing of the largest batch; score already packs by tokens
            size = DEFAULT_BATCH_SIZE
            if max_batch_size is not None:
                size = min(size, _positive_int("max_batch_size", max_batch_size))
        self.batch_size = size
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.batch_tokens = _positive_int("batch_tokens", batch_tokens)
        self.unidirectional = _flag("unidirectional", unidirectional)
        self.use_task_mask = _flag("use_task_mask", use_task_mask)
        self.truncation = _flag("truncation", truncation)
        self.progress = _flag("progress", progress)
        if self.unidirectional and not self.use_task_mask:
            raise ValueError("unidirectional=True needs use_task_mask=True (GLM-130B reads a text unidirectionally "
                             "only after [gMASK])")
        if backend is None:
            from ..generate.pipeline import GLMPipeline

            overrides = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
            backend = GLMPipeline.from_config(pretrained, **overrides)
        elif device is not None or dtype is not None:
            raise ValueError("device and dtype apply to pretrained=...; a backend passed in keeps its own")
        for name in ("tokenizer", "generate", "request"):
            if not hasattr(backend, name):
                raise TypeError(f"backend must be a GLMPipeline or GLMCluster, got {type(backend).__name__} "
                                f"(it has no .{name})")
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.max_length = _max_sequence_length(backend)
        # A GLMPipeline runs a request in this process, a GLMCluster on every engine: the same request object.
        self._run = backend.call if hasattr(backend, "call") else backend.run

    # ----- loglikelihood ------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log-probability, greedy) of each request's continuation after (or in the blank of) its context."""
        groups: dict[str, list[int]] = {}  # context -> the requests that continue it, in order
        continuations = []
        for index, request in enumerate(requests):
            context, continuation = _check_args(index, request, (str, str), "(context, continuation) strings")
            context, ids = self._split_pair(index, request, context, continuation)
            continuations.append(ids)
            groups.setdefault(context, []).append(index)
        contexts = {context: self._context_ids(members[0], requests[members[0]], context,
                                               max(len(continuations[i]) for i in members))
                    for context, members in groups.items()}
        built = []  # (request indices per context, request): all validated before the model runs
        for chunk in _chunks(list(groups.items()), self.batch_size):
            built.append(([members for _, members in chunk], ScoreRequest.build(
                self.tokenizer, self.max_length, [Tokens(contexts[context]) for context, _ in chunk],
                [[Tokens(continuations[i]) for i in members] for _, members in chunk],
                unidirectional=self.unidirectional, use_task_mask=self.use_task_mask,
                batch_tokens=self.batch_tokens)))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        with self._bar(len(requests), "glmkit loglikelihood", disable_tqdm) as bar:
            for members_list, request in built:
                for members, scores in zip(members_list, self._run(request)):
                    for index, score in zip(members, scores):
                        results[index] = (score.logprob, score.greedy)
                        self.cache_hook.add_partial("loglikelihood", requests[index].args, results[index])
                    bar.update(len(members))
        return results

    def _split_pair(self, index: int, request, context: str, continuation: str) -> tuple[str, tuple[int, ...]]:
        """The context (trailing whitespace moved to the continuation when it holds no mask) and the
        continuation's ids: text that follows the context, or a blank's text on its own (module docstring)."""
        masks = _masks(index, request, context)
        if not masks:
            stripped = context.rstrip()
            continuation, context = context[len(stripped):] + continuation, stripped
        elif len(masks) > 1:
            raise ValueError(f"{_describe(index, request)}: the context holds {len(masks)} masks; a scored "
                             f"context has one blank, which the continuation fills")
        elif self.unidirectional:
            raise ValueError(f"{_describe(index, request)}: the context holds {masks[0]}, but unidirectional "
                             f"scoring fills no blank: remove the mask or pass unidirectional=False")
        try:
            ids = tuple(self.tokenizer.encode(continuation, add_dummy_prefix=bool(masks)))
        except ValueError as error:
            raise ValueError(f"{_describe(index, request)}: the continuation: {error}") from None
        if not ids:
            raise ValueError(f"{_describe(index, request)}: the continuation {continuation!r} has no tokens to "
                             f"score")
        return context, ids

    def _context_ids(self, index: int, request, context: str, continuation_tokens: int) -> tuple[int, ...]:
        """A context's ids (its mask, if any, as the mask id), its start cut with truncation=True."""
        try:
            ids = tuple(self.tokenizer.encode_with_masks(context))
        except ValueError as error:
            raise ValueError(f"{_describe(index, request)}: the context: {error}") from None
        room = self.max_length - SCORE_OVERHEAD - continuation_tokens
        if len(ids) <= room:
            return ids
        if room < 1:
            raise ValueError(f"{_describe(index, request)}: a continuation of {continuation_tokens} tokens leaves no "
                             f"room for a context in the model's {self.max_length} positions: shorten the choices")
        if not self.truncation:
            raise ValueError(
                f"{_describe(index, request)}: the context ({len(ids)} tokens) and its longest continuation "
                f"({continuation_tokens}) take {len(ids) + continuation_tokens + SCORE_OVERHEAD} positions with "
                f"the mask and sop GLM adds; the model takes {self.max_length}. Shorten the task's prompts "
                f"(fewer shots) or pass truncation=True to keep the end of such contexts")
        kept = ids[len(ids) - room:]
        mask_ids = set(self.tokenizer.mask_ids.values())
        if any(i in mask_ids for i in ids) and not any(i in mask_ids for i in kept):
            raise ValueError(f"{_describe(index, request)}: truncation would cut the context's mask away (it "
                             f"is more than {room} tokens from the end): shorten the task's prompts")
        return kept

    # ----- loglikelihood_rolling ----------------------------------------------------------------------

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-probability of each request's whole text, read unidirectionally after [gMASK] sop, in windows."""
        windows = []  # (request index, context ids, continuation ids)
        for index, request in enumerate(requests):
            (text,) = _check_args(index, request, (str,), "(text,) with one string")
            try:
                ids = self.tokenizer.encode(text)
            except ValueError as error:
                raise ValueError(f"{_describe(index, request)}: {error}") from None
            windows += [(index, c, w) for c, w in rolling_windows(ids, self.max_length)]
        built = [(chunk, ScoreRequest.build(self.tokenizer, self.max_length, [Tokens(c) for _, c, _ in chunk],
                                            [Tokens(w) for _, _, w in chunk], unidirectional=True,
                                            use_task_mask=True, batch_tokens=self.batch_tokens))
                 for chunk in _chunks(windows, self.batch_size)]
        totals = [0.0] * len(requests)  # an empty text has no token to predict: log-probability 0
        with self._bar(len(windows), "glmkit loglikelihood_rolling", disable_tqdm) as bar:
            for chunk, request in built:
                for (index, _, _), score in zip(chunk, self._run(request)):
                    totals[index] += score.logprob
                bar.update(len(chunk))
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ----- generate_until -----------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation of its context, greedy unless its gen_kwargs say otherwise."""
        groups: dict[str, list[int]] = {}  # the settings (as JSON) -> the requests generated with them
        prompts, settings = [], {}
        for index, request in enumerate(requests):
            context, gen_kwargs = _check_args(index, request, (str, dict), "(context, gen_kwargs dict)")
            kwargs = self._generation_kwargs(index, request, gen_kwargs)
            prompts.append(self._prompt(index, request, context, kwargs["max_new_tokens"]))
            key = json.dumps(kwargs, sort_keys=True)
            settings[key] = kwargs
            groups.setdefault(key, []).append(index)
        built = []
        for key, members in groups.items():
            for chunk in _chunks(members, self.batch_size):
                try:
                    built.append((chunk, self.backend.request([prompts[i] for i in chunk], **settings[key])))
                except (TypeError, ValueError) as error:
                    raise type(error)(f"{_describe(chunk[0], requests[chunk[0]])} and the requests generated "
                                      f"with the same settings: {error}") from None
        results: list[str | None] = [None] * len(requests)
        with self._bar(len(requests), "glmkit generate_until", disable_tqdm) as bar:
            for chunk, request in built:
                for index, result in zip(chunk, self.backend.generate(request)):
                    results[index] = result.completion
                    self.cache_hook.add_partial("generate_until", requests[index].args, results[index])
                bar.update(len(chunk))
        return results

    def _generation_kwargs(self, index: int, request, gen_kwargs: dict) -> dict:
        """glmkit generate() keywords of lm-eval's gen_kwargs (until -> stop, max_gen_toks -> max_new_tokens)."""
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None)
        if until is not None:
            until = [until] if isinstance(until, str) else until
            if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) and s for s in until):
                raise ValueError(f"{_describe(index, request)}: until must be a string or a list of non-empty "
                                 f"strings, got {until!r}")
            kwargs["stop"] = list(until)
        if "max_gen_toks" in kwargs and "max_new_tokens" in kwargs:
            raise ValueError(f"{_describe(index, request)}: gen_kwargs give both max_gen_toks and max_new_tokens; "
                             f"keep one")
        limit = kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", self.max_gen_toks))
        try:
            kwargs["max_new_tokens"] = _positive_int("max_gen_toks", limit)
        except ValueError as error:
            raise ValueError(f"{_describe(index, request)}: {error}") from None
        return kwargs

    def _prompt(self, index: int, request, context: str, max_new_tokens: int) -> str:
        """The context as a GLM prompt (backend.request adds [gMASK] or eos, and sop), its start cut with
        truncation=True so that max_new_tokens fit after it."""
        masks = _masks(index, request, context)
        if not self.truncation:
            return context  # a prompt too long for the model fails in backend.request, naming the length
        tokens = self.tokenizer.tokens(context)
        # [gMASK] (or eos) and sop join the prompt; one more token of room, as the cut text is tokenized anew.
        room = self.max_length - max_new_tokens - 3
        if len(tokens) <= room:
            return context
        if room < 1:
            raise ValueError(f"{_describe(index, request)}: max_gen_toks={max_new_tokens} leaves no room for a "
                             f"context in the model's {self.max_length} tokens")
        start = tokens[len(tokens) - room].start
        if masks and not MASK_PATTERN.search(context, start):
            raise ValueError(f"{_describe(index, request)}: truncation would cut the context's mask away: "
                             f"shorten the task's prompts")
        return context[start:]

    # ----- helpers ------------------------------------------------------------------------------------

    def _bar(self, total: int, description: str, disable: bool):
        return tqdm(total=total, desc=description, disable=disable or not self.progress or total == 0)


def _max_sequence_length(backend) -> int:
    """The model's length: a GLMPipeline's model config, or a GLMCluster's loaded config."""
    model = getattr(backend, "model", None)
    if model is not None:
        return model.config.max_sequence_length
    config = getattr(backend, "config", None)
    if config is None:
        raise ValueError("the cluster has no model loaded: call cluster.load(config) before wrapping it")
    return config.model.max_sequence_length
