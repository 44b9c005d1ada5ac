"""`glmkit bench --score`: batched choice scoring on random weights, against the card's plain matmul rate.

Scoring is prefill only: each forward pass reads thousands of tokens, so its bound is the matmul rate, not the
memory bandwidth that bounds decoding. This mode builds a random model of any GLMConfig on one device
(glmkit.lab.random_model), makes `contexts` random contexts of `context_tokens` ids, each with `choices`
random choices of `choice_tokens` ids, and times `ScoreRequest.run` on them through a GLMPipeline: the real
path (choices packed behind one copy of their context, rows left-padded, `batch_tokens` a pass, logits only
at the scored positions).

Model FLOPs count the real tokens only (padding is waste, and lowers the fraction): per row and layer,
2 x linear weights per token plus attention's 4 x hidden per (query, key) pair of the row's square (GLM's
dense mask computes all of it), as `glmkit bench` counts a prefill; plus the output projection at each scored
position, 2 x hidden x vocab. The reference rate is a large plain torch.matmul measured in the same run:
fp16 on a GPU (whatever the model's dtype), fp32 on a CPU, whose half arithmetic is emulated.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass

import torch

from ..config import DTYPES
from ..generate.pipeline import GLMPipeline
from ..generate.scoring import DEFAULT_BATCH_TOKENS, ScoreRequest, Tokens
from .bench import prefill_flops
from .bench_options import BenchModel
from .random_model import build_random_model
from .timing import Clock, free_cached, peak_bytes, reset_peak

SCORE_KEYS = {
    "config_name": "preset or YAML the architecture came from",
    "config": "the GLMConfig measured (num_layers after any --layers override)",
    "dtype": "fp16, bf16 or fp32: weights and activations",
    "quantization": "null, int8 or int4 (weight-only)",
    "device": "the device's name, or 'cpu'",
    "torch": "torch version",
    "batch_tokens": "token budget of one forward pass (padding included)",
    "contexts": "contexts scored per timed call",
    "context_tokens": "ids of each context (the appended [MASK] and sop come on top)",
    "choices": "choices per context",
    "choice_tokens": "ids of each choice",
    "repeats": "timed calls behind the median",
    "parameters": "parameters of the model",
    "build_seconds": "time to materialise the random model on the device",
    "forward_passes": "forward passes one call makes",
    "rows": "batch rows one call makes (a context and the choices packed behind it)",
    "tokens": "real tokens a call feeds the model (contexts once per row, choices less their last token)",
    "padded_tokens": "tokens including left padding: the sum over passes of rows x longest row",
    "padding_fraction": "1 - tokens / padded_tokens",
    "scored_tokens": "continuation tokens scored (positions projected onto the vocabulary)",
    "call_ms": "median wall ms of one call (ScoreRequest.run, its results on the host)",
    "tokens_per_s": "tokens / call time",
    "choices_per_s": "choices scored / call time",
    "model_flops": "model FLOPs of one call (real tokens; see the module docstring)",
    "model_tflops": "model_flops / call time, 1e12 FLOP/s",
    "matmul_size": "n of the reference n x n @ n x n matmul",
    "matmul_dtype": "its dtype: fp16 on a GPU, fp32 on a CPU",
    "matmul_tflops": "its rate, 2 n^3 / time, 1e12 FLOP/s (median)",
    "matmul_fraction": "model_tflops / matmul_tflops",
    "peak_gpu_bytes": "peak allocated device memory while scoring (null on CPU)",
    "logprobs_finite": "every score of the last call is finite (random weights did not overflow)",
    "seconds": "wall time of the whole run",
}


@dataclass(frozen=True)
class RandomVocab:
    """What scoring needs of a tokenizer, for a random model that has none: the id count and GLM's special ids,
    placed at the top of the vocabulary (random contexts and choices are drawn below them)."""

    num_tokens: int
    special: int = 6  # ids at the top that are never drawn

    @property
    def mask_ids(self) -> dict[str, int]:
        return {"[MASK]": self.mask_id, "[sMASK]": self.num_tokens - 5, "[gMASK]": self.gmask_id}

    @property
    def mask_id(self) -> int:
        return self.num_tokens - 6

    @property
    def gmask_id(self) -> int:
        return self.num_tokens - 4

    @property
    def sop_id(self) -> int:
        return self.num_tokens - 3

    @property
    def eop_id(self) -> int:
        return self.num_tokens - 2

    @property
    def eos_id(self) -> int:
        return self.num_tokens - 1

    def decode(self, ids) -> str:
        """Random ids have no text."""
        return ""


@dataclass(frozen=True)
class ScoreBenchOptions(BenchModel):
    """What to score: the model, token budget and the shape of the random task."""

    batch_tokens: int = DEFAULT_BATCH_TOKENS
    contexts: int | None = None  # None: enough for about four full passes
    context_tokens: int = 128
    choices: int = 4
    choice_tokens: int = 8
    repeats: int = 3
    seed: int = 0
    matmul_size: int | None = None  # None: 8192 on a GPU, 512 on a CPU

    def __post_init__(self):
        super().__post_init__()
        for name in ("batch_tokens", "context_tokens", "choices", "choice_tokens", "repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.contexts is not None and self.contexts < 1:
            raise ValueError(f"contexts must be a positive integer (or None), got {self.contexts!r}")
        if self.matmul_size is not None and self.matmul_size < 1:
            raise ValueError(f"matmul_size must be a positive integer, got {self.matmul_size!r}")
        if self.context_tokens + 2 + self.choice_tokens - 1 > self.config.max_sequence_length:
            raise ValueError(f"context_tokens + choice_tokens + 1 = {self.context_tokens + self.choice_tokens + 1} "
                             f"exceeds max_sequence_length {self.config.max_sequence_length}")

    @property
    def num_contexts(self) -> int:
        row = self.context_tokens + 2 + self.choices * (self.choice_tokens - 1)
        return self.contexts or max(1, 4 * self.batch_tokens // row)


def matmul_tflops(device: torch.device, n: int, repeats: int = 10) -> tuple[float, str]:
    """(1e12 FLOP/s, dtype name) of a plain n x n @ n x n torch.matmul on `device` (median of repeats)."""
    clock = Clock(device)
    dtype = torch.float16 if clock.cuda else torch.float32
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = statistics.median(clock.time_ms(lambda: torch.matmul(a, b), repeats, warmup=3))
    a = b = None
    free_cached(device)
    return 2 * n**3 / ms / 1e9, "fp16" if clock.cuda else "fp32"


def random_request(options: ScoreBenchOptions, vocab: RandomVocab) -> ScoreRequest:
    """The call timed: random contexts, each with its random choices, as Tokens (the same for every seed)."""
    generator = torch.Generator().manual_seed(options.seed)
    top = vocab.num_tokens - vocab.special
    contexts = torch.randint(0, top, (options.num_contexts, options.context_tokens), generator=generator)
    choices = torch.randint(0, top, (options.num_contexts, options.choices, options.choice_tokens), generator=generator)
    return ScoreRequest.build(vocab, options.config.max_sequence_length, [Tokens(c) for c in contexts.tolist()],
                              [[Tokens(c) for c in row] for row in choices.tolist()],
                              batch_tokens=options.batch_tokens)


def run_score_bench(options: ScoreBenchOptions) -> dict:
    """Time batched choice scoring on random weights and return the result dict (SCORE_KEYS)."""
    started = time.perf_counter()
    device = torch.device(options.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {options.device} asked for, but this machine has no CUDA GPU; use --device cpu")
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    clock = Clock(device)
    size = options.matmul_size or (8192 if clock.cuda else 512)
    reference, reference_dtype = matmul_tflops(device, size)  # before the model takes the memory

    mark = time.perf_counter()
    model = build_random_model(options.config, DTYPES[options.dtype], device, quantization=options.quantization,
                               seed=options.seed)
    clock.sync()
    build_seconds = time.perf_counter() - mark
    vocab = RandomVocab(options.config.vocab_size)
    pipeline = GLMPipeline(model, vocab)  # the Generator of GLMPipeline: fused kernels on a GPU, as used
    request = random_request(options, vocab)
    batches = request.batches
    rows = [row for batch in batches for row in batch]
    tokens = sum(r.length for r in rows)
    padded = sum(len(batch) * max(r.length for r in batch) for batch in batches)
    scored = sum(r.targets for r in rows)
    config = options.config
    flops = sum(prefill_flops(model, 1, r.length) for r in rows) + 2.0 * config.hidden_size * config.vocab_size * scored

    reset_peak(device)
    results: list = []

    def call():
        results[:] = pipeline.run(request)

    ms = statistics.median(clock.time_ms(call, options.repeats))
    finite = all(torch.isfinite(torch.tensor([s.logprob for choices in results for s in choices])).tolist())
    seconds = ms / 1e3
    model_tflops = flops / seconds / 1e12
    return {
        "config_name": options.config_name, "config": dataclasses.asdict(config), "dtype": options.dtype,
        "quantization": options.quantization,
        "device": torch.cuda.get_device_name(device) if clock.cuda else "cpu", "torch": torch.__version__,
        "batch_tokens": options.batch_tokens, "contexts": options.num_contexts,
        "context_tokens": options.context_tokens, "choices": options.choices, "choice_tokens": options.choice_tokens,
        "repeats": options.repeats, "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": build_seconds, "forward_passes": len(batches), "rows": len(rows), "tokens": tokens,
        "padded_tokens": padded, "padding_fraction": 1 - tokens / padded, "scored_tokens": scored,
        "call_ms": ms, "tokens_per_s": tokens / seconds,
        "choices_per_s": options.num_contexts * options.choices / seconds,
        "model_flops": flops, "model_tflops": model_tflops, "matmul_size": size, "matmul_dtype": reference_dtype,
        "matmul_tflops": reference, "matmul_fraction": model_tflops / reference,
        "peak_gpu_bytes": peak_bytes(device), "logprobs_finite": finite,
        "seconds": time.perf_counter() - started,
    }
