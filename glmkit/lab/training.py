"""Training and evaluating small GLMs on the blank-infilling objective (glmkit.lab.objective): loss, perplexity, loop.

Used to train the shipped demo model (scripts/train_demo_model.py) and by its tests; the loop is plain
AdamW with warm-up and cosine decay, mixed precision on GPUs, and evaluation by held-out perplexity.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from ..model import GLM
from .objective import IGNORE, Batch


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
