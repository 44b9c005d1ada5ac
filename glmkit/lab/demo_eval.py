"""The demo model's post-training evaluation (scripts/train_demo_model.py): samples, code loss per character,
held-out translation, the shipped model as a baseline, the training curve, and the records of a printed log.

Kept apart from the training script so that a run whose evaluation failed can be evaluated again from its
checkpoint and console output (`train_demo_model.py --evaluate CHECKPOINT --train-log train.log`).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from ..config import load_config
from ..generate.pipeline import GLMPipeline, load_model
from ..tokenizer import GLMTokenizer
from .objective import Corpus, heldout_lm_samples, pack_rows
from .training import evaluate
from .word_pairs import translation_accuracy

PROMPTS = [  # shown after training: [MASK] infilling of code, [gMASK] continuations of a docstring and prose
    "def [MASK](self, other):\n    return self.value + other.value",
    'def read_lines(path):\n    """',
    "import os\nimport [MASK]\n\n\ndef main():\n    args = sys.argv[1:]",
    "Return True if the [MASK] is empty, False otherwise.",
    "The module provides",
]
# What the training script prints of a record: "key value" pairs after "step N", in this order and format.
_PRINTED = {"train_loss": "{:.3f}", "lr": "{:.2e}", "tokens_per_s": "{:,.0f}", "heldout_perplexity": "{:.2f}",
            "ratio_to_unigram": "{:.3f}", "heldout_blank_loss": "{:.3f}", "planned_steps": "{}",
            "elapsed_s": "{:.0f}s"}
_RECORD_LINE = re.compile(r"^step\s+(\d+)\s*(.*)$")
_DEVICE_LINE = re.compile(r"^model .*; device (\S+)(?: (.+))?$")


def format_record(record: dict) -> str | None:
    """The console line of a training record: evaluations, the step plan and every 500th step; else None."""
    if not ({"heldout_perplexity", "planned_steps"} & set(record) or record["step"] % 500 == 0):
        return None
    parts = [f"step {record['step']:6d}"]
    parts += [f"{key} " + fmt.format(record[key]) for key, fmt in _PRINTED.items() if key in record]
    return "  ".join(parts)


def parse_train_log(text: str) -> dict:
    """The records and training device a training run printed (every evaluation, a heartbeat every 500
    steps): {"records": [...], "device": ..., "device_name": ...}, as training_log.json holds them."""
    records, device, device_name = [], None, None
    for number, line in enumerate(text.splitlines(), 1):
        if found := _DEVICE_LINE.match(line):
            device, device_name = found[1], found[2] or found[1]
        if not (found := _RECORD_LINE.match(line)):
            continue
        record, fields = {"step": int(found[1])}, found[2].split()
        if len(fields) % 2:
            raise ValueError(f"train log line {number}: expected 'key value' pairs after the step, got {line!r}")
        for key, value in zip(fields[::2], fields[1::2]):
            if key not in _PRINTED:
                raise ValueError(f"train log line {number}: unknown key {key!r} (known: {', '.join(_PRINTED)})")
            number_text = value.replace(",", "").removesuffix("s")
            record[key] = int(number_text) if key == "planned_steps" else float(number_text)
        records.append(record)
    if not any("heldout_perplexity" in r for r in records):
        raise ValueError("the train log holds no evaluation record ('step N ... heldout_perplexity X'): "
                         "pass the console output of scripts/train_demo_model.py as --train-log")
    return {"records": records, "device": device, "device_name": device_name}


def sample_prompts(pipeline: GLMPipeline) -> list[dict]:
    """Greedy generations for PROMPTS (as docs/demo-model.md shows them)."""
    samples = []
    for prompt in PROMPTS:
        result = pipeline.generate(prompt, max_new_tokens=48, no_repeat_ngram_size=4)
        samples.append({"prompt": prompt, "text": result.text, "finish_reason": result.finish_reason})
    return samples


def nats_per_char(result, samples, tokenizer: GLMTokenizer) -> float:
    """Held-out loss per character of the scored text: comparable across tokenizers, unlike perplexity."""
    chars = sum(len(tokenizer.decode([t for t in s.targets if t != tokenizer.eop_id])) for s in samples)
    return result.text_loss * result.num_text / chars


def heldout_batches(corpus: Corpus, tokenizer: GLMTokenizer, sequence_length: int, rows: int,
               windows: int | None) -> tuple[list, list]:
    """The held-out [gMASK] windows tiling `corpus` (the first `windows` of them) and their packed batches."""
    samples = heldout_lm_samples(corpus, tokenizer, sequence_length, windows)
    batches = [pack_rows([[s] for s in samples[i:i + rows]], sequence_length, tokenizer.eop_id)
               for i in range(0, len(samples), rows)]
    return samples, batches


def score_translation(backend, translation: dict, limit: int | None) -> dict:
    """Held-out accuracy (with per-pair rows), the same on a sample of training pairs, and a few answers
    without the stop."""
    items = translation["heldout"][:limit]
    scores = translation_accuracy(backend, items)
    memory_items = translation["memory"][:limit]
    scores["memory"] = translation_accuracy(backend, memory_items)
    # The dictionary's answers beside each row, for notebook 03's tables of training and held-out words.
    for rows, scored in ((scores["rows"], items), (scores["memory"]["rows"], memory_items)):
        for row, item in zip(rows, scored):
            row["translations"] = item["accepted"]
    # Without stops the answer runs on into invented examples: what notebook 03 shows the stop sequence for.
    scores["without_stop"] = []
    for item in items[:4]:
        result = backend.generate(item["prompt"], max_new_tokens=24)
        scores["without_stop"].append({"english": item["english"], "completion": result.completion,
                                       "finish_reason": result.finish_reason})
    return scores


def score_baseline(heldout_texts: tuple[str, ...], translation: dict | None, rows: int, windows: int | None,
                   pairs: int | None, device) -> dict:
    """The shipped demo model (configs/glm-tiny.yaml) on the same held-out code and translation prompts."""
    kit = load_config("glm-tiny").replace(dtype="fp32", device=str(device))
    model, tokenizer = load_model(kit), GLMTokenizer.load(kit.tokenizer)
    own = Corpus(heldout_texts, tuple(len(t) / max(1, len(tokenizer.encode(t))) for t in heldout_texts))
    samples, batches = heldout_batches(own, tokenizer, model.config.max_sequence_length, rows, windows)
    lm = evaluate(model, batches, device)
    scores = {"checkpoint": str(kit.checkpoint), "heldout_windows": len(samples), "heldout_perplexity": lm.perplexity,
              "heldout_nats_per_char": nats_per_char(lm, samples, tokenizer)}
    if translation:
        found = translation_accuracy(GLMPipeline(model, tokenizer, kit), translation["heldout"][:pairs])
        scores["translation"] = {k: v for k, v in found.items() if k != "rows"}
        scores["translation"]["first_answers"] = [r["answer"] for r in found["rows"][:8]]
    return scores


def plot(log: dict, path: Path) -> bool:
    """Training curve: train loss, held-out losses and the unigram baseline (in nats per token)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {path.name}; run --plot-only on the log where it is")
        return False
    records = log["records"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    train_points = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    lm_points = [(r["step"], math.log(r["heldout_perplexity"])) for r in records if "heldout_perplexity" in r]
    blank_points = [(r["step"], r["heldout_blank_loss"]) for r in records if "heldout_blank_loss" in r]
    ax.plot(*zip(*train_points), lw=1, alpha=0.7, label="train loss (all targets)")
    ax.plot(*zip(*lm_points), marker="o", ms=3, label="held-out [gMASK] text loss")
    if blank_points:
        ax.plot(*zip(*blank_points), marker="s", ms=3, label="held-out [MASK]/[sMASK] loss")
    unigram = math.log(log["result"]["unigram_perplexity"])
    ax.axhline(unigram, color="gray", ls="--", label=f"unigram baseline (ppl {math.exp(unigram):.0f})")
    ax.axhline(unigram - math.log(3), color="gray", ls=":", label="target: 1/3 of unigram perplexity")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per token")
    ax.set_ylim(0, min(max(v for _, v in train_points + lm_points), unigram + 3))
    model = log["recipe"]["model"]
    ax.set_title(f"{log['recipe']['config_name']}: {model['num_layers']} layers, hidden {model['hidden_size']}, "
                 f"final held-out ppl {log['result']['heldout_perplexity']:.1f}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
