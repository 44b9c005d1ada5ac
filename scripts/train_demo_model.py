"""Train the demo GLM on the Python standard library's source with GLM-130B's objective; one seeded command.

Steps: (1) the corpus: every stdlib `*.py` file (code, docstrings, comments; sorted paths; site-packages and
the codec tables under encodings/ left out), a fixed ~4 % of package files held out for evaluation, each file
tokenized once for its token count and the unigram baseline. It is built from the stdlib of the Python that
runs this script and saved to --corpus; when that file exists it is used as is, so a machine with another
Python (or none of the stdlib) trains on the same text. (2) glm-tiny (or --config, with overrides) trained
with glmkit.lab.objective's blank-infilling objective for --minutes (or exactly --steps). (3) held-out perplexity
of the model and of an add-one unigram on the same tokens, the checkpoint as 2 fp16 SAT shards in
<out>/checkpoint, <out>/training_log.json and <out>/training_curve.png; the checkpoint is loaded back with
glmkit.generate.pipeline.load_model and a few prompts are generated with GLMPipeline.

    python scripts/train_demo_model.py --build-corpus-only        # writes the corpus file and exits
    python scripts/train_demo_model.py --device cuda --minutes 8  # trains
    python scripts/train_demo_model.py --plot-only artifacts/glm-tiny-trained/training_log.json
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path

import torch

from glmkit.checkpoint import save_checkpoint
from glmkit.config import REPO_ROOT, load_config
from glmkit.generate.blanks import check_masks
from glmkit.model import GLM
from glmkit.generate.pipeline import GLMPipeline, load_model
from glmkit.parallel.layout import split_tensor
from glmkit.tokenizer import DEMO_TOKENIZER_DIR, MODEL_FILE, NUM_IMAGE_TOKENS, GLMTokenizer
from glmkit.lab.objective import BatchStream, Corpus, ObjectiveSettings, heldout_lm_samples, make_batch, pack_rows
from glmkit.lab.training import (TrainSettings, evaluate, init_weights, perplexity, scored_tokens, train,
                             unigram_log_probs)

CORPUS_FILE = REPO_ROOT / "artifacts" / "demo-corpus" / "stdlib-corpus.json.gz"
CORPUS_FORMAT = "glmkit-demo-corpus-1"
EXCLUDED_DIRS = {"site-packages", "dist-packages", "encodings", "__pycache__"}
HELDOUT_MODULUS = 25  # package files whose path hash is 0 mod 25 are held out (top-level files trained the tokenizer)
EVAL_SEED = 20_000  # the held-out [MASK]/[sMASK] batches are the same whatever the training seed
NUM_SHARDS = 2
PROMPTS = [  # shown after training: [MASK] infilling of code, [gMASK] continuations of a docstring and prose
    "def [MASK](self, other):\n    return self.value + other.value",
    'def read_lines(path):\n    """',
    "import os\nimport [MASK]\n\n\ndef main():\n    args = sys.argv[1:]",
    "Return True if the [MASK] is empty, False otherwise.",
    "The module provides",
]


# ----- corpus -----------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stdlib_files() -> list[tuple[str, str, str]]:
    """(path, text, split) of every stdlib source file used, in sorted path order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in stdlib.rglob("*.py"):
        rel = path.relative_to(stdlib).as_posix()
        if not EXCLUDED_DIRS & set(rel.split("/")[:-1]):
            found.append(rel)
    files = []
    for rel in sorted(found):
        text = (stdlib / rel).read_text(encoding="utf-8", errors="replace")
        # glmkit refuses prompts holding mask look-alikes such as "[mask]"; drop the few lines that do.
        lines = [line for line in text.split("\n") if not _has_mask_text(line)]
        text = "\n".join(lines).strip("\n")
        if not text:
            continue
        held = "/" in rel and int(hashlib.sha256(rel.encode()).hexdigest(), 16) % HELDOUT_MODULUS == 0
        files.append((rel, text, "heldout" if held else "train"))
    return files


def _has_mask_text(line: str) -> bool:
    try:
        return bool(check_masks(line))
    except ValueError:
        return True


def build_corpus(tokenizer: GLMTokenizer, tokenizer_file: Path) -> dict:
    """Tokenize the stdlib files once: token counts per file and unigram counts over the training files."""
    documents, counts = [], Counter()
    for rel, text, split in stdlib_files():
        ids = tokenizer.encode(text)
        documents.append({"path": rel, "split": split, "num_tokens": len(ids), "text": text})
        if split == "train":
            counts.update(ids)
    return {"format": CORPUS_FORMAT, "python": sys.version.split()[0], "stdlib": sysconfig.get_paths()["stdlib"],
            "tokenizer_sha256": _sha256(tokenizer_file), "documents": documents,
            "unigram_counts": {str(k): v for k, v in sorted(counts.items())}}


def save_corpus(corpus: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:  # byte-reproducible
        f.write(json.dumps(corpus, ensure_ascii=False).encode("utf-8"))
    os.replace(tmp, path)


def load_corpus(path: Path, tokenizer_file: Path) -> dict:
    with gzip.open(path, "rb") as f:
        corpus = json.loads(f.read().decode("utf-8"))
    if corpus.get("format") != CORPUS_FORMAT:
        raise SystemExit(f"{path} is not a {CORPUS_FORMAT} file; delete it to rebuild")
    if corpus["tokenizer_sha256"] != _sha256(tokenizer_file):
        raise SystemExit(f"{path} was tokenized with another {tokenizer_file.name}; delete it to rebuild")
    return corpus


def split_corpus(corpus: dict, split: str) -> Corpus:
    docs = [d for d in corpus["documents"] if d["split"] == split]
    return Corpus(tuple(d["text"] for d in docs), tuple(len(d["text"]) / max(1, d["num_tokens"]) for d in docs))


def corpus_stats(corpus: dict) -> dict:
    stats = {"python": corpus["python"], "tokenizer_sha256": corpus["tokenizer_sha256"]}
    for split in ("train", "heldout"):
        docs = [d for d in corpus["documents"] if d["split"] == split]
        stats[split] = {"files": len(docs), "chars": sum(len(d["text"]) for d in docs),
                        "tokens": sum(d["num_tokens"] for d in docs)}
    stats["heldout"]["paths"] = [d["path"] for d in corpus["documents"] if d["split"] == "heldout"]
    return stats


# ----- outputs ----------------------------------------------------------------------------------------------

def save_sharded(model: GLM, out: Path, iteration: int) -> None:
    """fp16 weights as NUM_SHARDS SAT shards, as scripts/make_demo_model.py writes them."""
    state = {name: tensor.detach().to("cpu", torch.float16) for name, tensor in model.state_dict().items()}
    shards = [{name: split_tensor(name, t, rank, NUM_SHARDS).clone() for name, t in state.items()}
              for rank in range(NUM_SHARDS)]
    model_config = {**dataclasses.asdict(model.config), "model_parallel_size": NUM_SHARDS}
    save_checkpoint(out, shards, iteration=iteration, model_config=model_config)


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


# ----- main -------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "artifacts" / "glm-tiny-trained",
                   help="output folder: checkpoint/, training_log.json, training_curve.png")
    p.add_argument("--corpus", type=Path, default=CORPUS_FILE, help="corpus file (built here if missing)")
    p.add_argument("--build-corpus-only", action="store_true", help="write the corpus file and exit")
    p.add_argument("--plot-only", type=Path, metavar="LOG", help="redraw the curve of a training_log.json")
    p.add_argument("--tokenizer", type=Path, default=DEMO_TOKENIZER_DIR)
    p.add_argument("--config", default="glm-tiny", help="model config name or YAML path")
    p.add_argument("--num-layers", type=int)
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--num-attention-heads", type=int)
    p.add_argument("--inner-hidden-size", type=int)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--minutes", type=float, default=8.0, help="time budget of training and its evaluations")
    p.add_argument("--steps", type=int, help="exact number of steps (overrides --minutes; reproduces a run)")
    p.add_argument("--batch-rows", type=int, default=64, help="rows of max_sequence_length tokens per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--workers", type=int, help="data-loader processes (default: 0 on CPU, up to 8 on CUDA)")
    p.add_argument("--eval-windows", type=int, help="held-out [gMASK] windows scored (default: all, ~830)")
    p.add_argument("--eval-blank-batches", type=int, default=2, help="held-out [MASK]/[sMASK] batches")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.plot_only:
        log = json.loads(args.plot_only.read_text())
        plot(log, args.plot_only.with_name("training_curve.png"))
        return
    tokenizer_file = args.tokenizer / MODEL_FILE
    tokenizer = GLMTokenizer.load(args.tokenizer)
    if args.corpus.is_file():
        corpus = load_corpus(args.corpus, tokenizer_file)
    else:
        t0 = time.perf_counter()
        corpus = build_corpus(tokenizer, tokenizer_file)
        save_corpus(corpus, args.corpus)
        print(f"built {args.corpus} from Python {corpus['python']}'s stdlib in {time.perf_counter() - t0:.0f} s "
              f"({args.corpus.stat().st_size / 1e6:.1f} MB)")
    stats = corpus_stats(corpus)
    for split in ("train", "heldout"):
        print(f"corpus {split:8s} {stats[split]['files']:5d} files {stats[split]['chars'] / 1e6:6.1f} M chars "
              f"{stats[split]['tokens'] / 1e6:6.2f} M tokens")
    if args.build_corpus_only:
        return

    checkpoint_dir = args.out / "checkpoint"
    if checkpoint_dir.exists():
        raise SystemExit(f"{checkpoint_dir} exists; choose another --out or delete it")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    config = load_config(args.config)
    overrides = {k: v for k, v in (("num_layers", args.num_layers), ("hidden_size", args.hidden_size),
                                   ("num_attention_heads", args.num_attention_heads),
                                   ("inner_hidden_size", args.inner_hidden_size)) if v is not None}
    model_config = dataclasses.replace(config.model, **overrides)
    if tokenizer.num_tokens > model_config.vocab_size:
        raise SystemExit(f"tokenizer has {tokenizer.num_tokens} ids but vocab_size is {model_config.vocab_size}")
    model_config.check_shardable(NUM_SHARDS)
    objective = ObjectiveSettings(sequence_length=model_config.max_sequence_length)
    settings = TrainSettings(learning_rate=args.lr, min_learning_rate=args.lr / 10,
                             warmup_steps=min(args.warmup_steps, max(1, args.steps // 10)) if args.steps
                             else args.warmup_steps,
                             steps=args.steps, time_budget_s=None if args.steps else args.minutes * 60)
    torch.manual_seed(args.seed)
    train_corpus, heldout = split_corpus(corpus, "train"), split_corpus(corpus, "heldout")

    # Fixed held-out sets: [gMASK] windows tiling the held-out files (perplexity) and blank batches.
    lm_samples = heldout_lm_samples(heldout, tokenizer, objective.sequence_length, args.eval_windows)
    lm_batches = [pack_rows([[s] for s in lm_samples[i:i + args.batch_rows]], objective.sequence_length,
                            tokenizer.eop_id) for i in range(0, len(lm_samples), args.batch_rows)]
    blank_objective = dataclasses.replace(objective, gmask_fraction=0.0)
    blank_batches = [make_batch(heldout, tokenizer, blank_objective, args.batch_rows, EVAL_SEED, i)
                     for i in range(args.eval_blank_batches)]
    # The baseline: an add-one unigram over every id text can produce (all but the image ids).
    unigram = unigram_log_probs({int(k): v for k, v in corpus["unigram_counts"].items()},
                                range(NUM_IMAGE_TOKENS, tokenizer.num_tokens))
    heldout_tokens = scored_tokens(lm_batches)
    unigram_ppl = perplexity(unigram, heldout_tokens)
    print(f"held-out: {len(lm_samples)} [gMASK] windows, {len(heldout_tokens)} scored tokens; "
          f"unigram perplexity {unigram_ppl:.1f}")

    model = GLM(model_config)
    init_weights(model, args.seed)
    model.to(device)
    print(f"model {config.name}{' (overridden)' if overrides else ''}: {model_config.num_parameters():,} parameters; "
          f"device {device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}")
    trained = torch.compile(model) if args.compile else model

    def evaluate_fn() -> dict:
        lm = evaluate(trained, lm_batches, device)
        metrics = {"eval_loss": lm.loss, "heldout_perplexity": lm.perplexity,
                   "ratio_to_unigram": lm.perplexity / unigram_ppl}
        if blank_batches:
            metrics["heldout_blank_loss"] = evaluate(trained, blank_batches, device).loss
        return metrics

    def on_record(record: dict) -> None:
        if not ({"heldout_perplexity", "planned_steps"} & set(record) or record["step"] % 500 == 0):
            return  # every record is in training_log.json; print evaluations and a heartbeat
        parts = [f"step {record['step']:6d}"]
        for key, fmt in (("train_loss", "{:.3f}"), ("lr", "{:.2e}"), ("tokens_per_s", "{:,.0f}"),
                         ("heldout_perplexity", "{:.2f}"), ("ratio_to_unigram", "{:.3f}"),
                         ("heldout_blank_loss", "{:.3f}"), ("planned_steps", "{}"), ("elapsed_s", "{:.0f}s")):
            if key in record:
                parts.append(f"{key} " + fmt.format(record[key]))
        print("  ".join(parts), flush=True)

    workers = args.workers if args.workers is not None else (0 if device.type == "cpu" else
                                                             max(1, min(8, (os.cpu_count() or 2) - 2)))
    # Workers hand batches over through /dev/shm (the (b, 1, s, s) mask dominates); a small one (container
    # default 64 MB) would kill them with a bus error, so build batches in this process instead.
    in_flight = 2 * workers * 4 * args.batch_rows * objective.sequence_length * (objective.sequence_length + 40)
    shm_free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else 0
    if workers and shm_free < in_flight:
        print(f"/dev/shm has {shm_free / 1e6:.0f} MB free, workers need about {in_flight / 1e6:.0f} MB: "
              f"building batches in the main process (slower)")
        workers = 0
    stream = BatchStream(train_corpus, args.tokenizer, objective, args.batch_rows, args.seed)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                         pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if workers else None, persistent_workers=False)
    started = time.perf_counter()
    records = train(trained, iter(loader), settings, device, evaluate_fn, on_record)
    train_seconds = time.perf_counter() - started
    steps = max(r["step"] for r in records)
    final = next(r for r in reversed(records) if "heldout_perplexity" in r)

    args.out.mkdir(parents=True, exist_ok=True)
    save_sharded(model, checkpoint_dir, iteration=steps)
    size = sum(p.stat().st_size for p in checkpoint_dir.rglob("*") if p.is_file())

    # Load the written shards back through the inference path and check they give the same perplexity.
    kit = config.replace(model=model_config, checkpoint=checkpoint_dir.resolve(), tokenizer=args.tokenizer.resolve(),
                         dtype="fp32", device=str(device))
    reloaded = load_model(kit)
    reloaded_ppl = evaluate(reloaded, lm_batches, device).perplexity
    pipeline = GLMPipeline(reloaded, tokenizer, kit)
    samples = []
    for prompt in PROMPTS:
        result = pipeline.generate(prompt, max_new_tokens=48, no_repeat_ngram_size=4)
        samples.append({"prompt": prompt, "text": result.text, "finish_reason": result.finish_reason})

    result = {"heldout_perplexity": final["heldout_perplexity"], "unigram_perplexity": unigram_ppl,
              "ratio": final["heldout_perplexity"] / unigram_ppl, "reloaded_fp16_perplexity": reloaded_ppl,
              "heldout_scored_tokens": len(heldout_tokens), "steps": steps, "train_seconds": train_seconds,
              "checkpoint_bytes": size, "tokenizer_bytes": tokenizer_file.stat().st_size, "samples": samples}
    recipe = {"command": " ".join(sys.argv), "config_name": config.name, "model": dataclasses.asdict(model_config),
              "objective": dataclasses.asdict(objective), "training": dataclasses.asdict(settings),
              "batch_rows": args.batch_rows, "seed": args.seed, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "python": sys.version.split()[0], "corpus": stats,
              "eval": {"windows": len(lm_samples), "blank_batches": args.eval_blank_batches, "eval_seed": EVAL_SEED},
              "data_workers": workers,
              "reproduce": " ".join(sys.argv[1:]) + f" --steps {steps}  (bitwise only on CPU: CUDA kernels "
                                                      f"such as the embedding backward are not deterministic)"}
    log = {"recipe": recipe, "records": records, "result": result}
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    plot(log, args.out / "training_curve.png")

    for sample in samples:
        print(f"--- {sample['prompt']!r} ->\n{sample['text']}")
    print(f"\nwrote {checkpoint_dir} ({size / 1e6:.1f} MB in {NUM_SHARDS} fp16 shards, iteration {steps}), "
          f"{args.out / 'training_log.json'}, {args.out / 'training_curve.png'}")
    print(f"trained {steps} steps in {train_seconds / 60:.1f} min on {recipe['device_name']}")
    print(f"held-out perplexity: model {result['heldout_perplexity']:.2f} (reloaded fp16 shards "
          f"{reloaded_ppl:.2f}), unigram {unigram_ppl:.2f}, ratio {result['ratio']:.3f} (target <= 0.333)")


if __name__ == "__main__":
    main()
