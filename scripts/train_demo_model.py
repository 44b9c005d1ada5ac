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

With --pairs (English -> German pairs from scripts/make_word_pairs.py) the corpus also holds few-shot
documents of the training pairs (glmkit.lab.word_pairs.pair_documents), --pair-share of the training
characters, and the run reports held-out translation accuracy: notebook 03's `en-de-translation` prompt
for each held-out English word, greedy with stop "\n", exact match against the held-out German (and
against any translation the dictionary gives). The prompts are built into the corpus file here, where
glmkit.widgets imports; the GPU image has no ipywidgets. --baseline scores the shipped demo model on the
same held-out code (per character: the tokenizers differ) and translations.

    python scripts/train_demo_model.py --build-corpus-only        # writes the corpus file and exits
    python scripts/train_demo_model.py --device cuda --minutes 8  # trains
    python scripts/train_demo_model.py --plot-only artifacts/glm-tiny-trained/training_log.json
    python scripts/train_demo_model.py TRAINING_FLAGS --evaluate OUT/checkpoint --train-log train.log \
        --out OUT --device cpu   # only the part after training, on a finished run's shards and console output
    python scripts/install_demo_model.py OUT                     # a finished run -> demo/ and docs/demo-model/
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path

import torch

from glmkit.checkpoint import inspect_checkpoint, save_checkpoint
from glmkit.lab.demo_eval import (format_record, heldout_batches, nats_per_char, parse_train_log, plot,
                                  sample_prompts, score_baseline, score_translation)
from glmkit.lab.word_pairs import load_pairs, pair_documents
from glmkit.config import REPO_ROOT, load_config
from glmkit.generate.blanks import check_masks
from glmkit.model import GLM
from glmkit.generate.pipeline import GLMPipeline, load_model
from glmkit.parallel.layout import split_tensor
from glmkit.tokenizer import DEMO_TOKENIZER_DIR, MODEL_FILE, NUM_IMAGE_TOKENS, GLMTokenizer
from glmkit.lab.objective import BatchStream, Corpus, ObjectiveSettings, make_batch
from glmkit.lab.training import (TrainSettings, evaluate, init_weights, perplexity, scored_tokens, train,
                             unigram_log_probs)

CORPUS_FILE = REPO_ROOT / "artifacts" / "demo-corpus" / "stdlib-corpus.json.gz"
MIXED_CORPUS_FILE = REPO_ROOT / "artifacts" / "demo-corpus" / "demo-corpus.json.gz"  # with --pairs
CORPUS_FORMAT = "glmkit-demo-corpus-2"
TEMPLATE = "en-de-translation"  # notebook 03's few-shot template: its prompt is the held-out test
MEMORY_SAMPLE = 300  # training pairs scored like the held-out ones: how much the model memorised
EXCLUDED_DIRS = {"site-packages", "dist-packages", "encodings", "__pycache__"}
HELDOUT_MODULUS = 25  # package files whose path hash is 0 mod 25 are held out (top-level files trained the tokenizer)
EVAL_SEED = 20_000  # the held-out [MASK]/[sMASK] batches are the same whatever the training seed
NUM_SHARDS = 2


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


def build_corpus(tokenizer: GLMTokenizer, tokenizer_file: Path, pairs_file: Path | None = None,
                 pair_share: float = 0.3, phrase_share: float = 0.1, seed: int = 1234) -> dict:
    """Tokenize the stdlib files once: token counts per file and unigram counts over the training files
    (code only, so the baseline means what it meant before pairs). With `pairs_file`, few-shot pair
    documents of `pair_share` of the training characters join the training split, and the held-out
    translation prompts are built."""
    documents, counts = [], Counter()
    for rel, text, split in stdlib_files():
        ids = tokenizer.encode(text)
        documents.append({"path": rel, "split": split, "source": "stdlib", "num_tokens": len(ids), "text": text})
        if split == "train":
            counts.update(ids)
    corpus = {"format": CORPUS_FORMAT, "python": sys.version.split()[0], "stdlib": sysconfig.get_paths()["stdlib"],
              "tokenizer_sha256": _sha256(tokenizer_file), "pairs_sha256": None, "documents": documents,
              "unigram_counts": {str(k): v for k, v in sorted(counts.items())}}
    if pairs_file is not None:
        corpus["pairs_sha256"] = _sha256(pairs_file)
        corpus["translation"] = pair_corpus(tokenizer, pairs_file, pair_share, phrase_share, seed, documents)
    return corpus


def pair_corpus(tokenizer: GLMTokenizer, pairs_file: Path, pair_share: float, phrase_share: float, seed: int,
                documents: list) -> dict:
    """Append the pair documents to `documents`; the held-out and memorisation prompts and the pairs' facts."""
    from glmkit.widgets.templates import load_template  # imports ipywidgets: only where the corpus is built

    if not 0 < pair_share < 1:
        raise SystemExit(f"--pair-share must be between 0 and 1 (a share of the training characters), "
                         f"got {pair_share}")
    if not 0 <= phrase_share < 1:
        raise SystemExit(f"--phrase-share must be in [0, 1) (a share of the pair blocks), got {phrase_share}")
    train_pairs, heldout, phrases, payload = load_pairs(pairs_file)
    template = load_template(TEMPLATE)
    code_chars = sum(len(d["text"]) for d in documents if d["split"] == "train")
    texts = pair_documents(train_pairs, phrases, round(code_chars * pair_share / (1 - pair_share)), seed,
                           lead_in=[(e.input, e.output) for e in template.examples], phrase_share=phrase_share)
    for i, text in enumerate(texts):
        documents.append({"path": f"pairs/{i:06d}", "split": "train", "source": "pairs",
                          "num_tokens": len(tokenizer.encode(text)), "text": text})
    shown = {e.input for e in template.examples}
    memory = [p for p in train_pairs if p.english not in shown][:: max(1, len(train_pairs) // MEMORY_SAMPLE)]

    def items(pairs):
        return [{"english": p.english, "german": p.german, "accepted": list(p.accepted),
                 "prompt": template.build_prompt(p.english)} for p in pairs]

    return {"template": TEMPLATE, "source": payload["source"], "settings": payload["settings"],
            "pair_share": pair_share, "phrase_share": phrase_share, "train_pairs": len(train_pairs),
            "phrases": len(phrases), "documents": len(texts), "heldout": items(heldout),
            "memory": items(memory[:MEMORY_SAMPLE])}


def save_corpus(corpus: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:  # byte-reproducible
        f.write(json.dumps(corpus, ensure_ascii=False).encode("utf-8"))
    os.replace(tmp, path)


def load_corpus(path: Path, tokenizer_file: Path, pairs_file: Path | None) -> dict:
    with gzip.open(path, "rb") as f:
        corpus = json.loads(f.read().decode("utf-8"))
    if corpus.get("format") != CORPUS_FORMAT:
        raise SystemExit(f"{path} is not a {CORPUS_FORMAT} file; delete it to rebuild")
    if corpus["tokenizer_sha256"] != _sha256(tokenizer_file):
        raise SystemExit(f"{path} was tokenized with another {tokenizer_file.name}; delete it to rebuild")
    if pairs_file is not None and pairs_file.is_file() and corpus["pairs_sha256"] != _sha256(pairs_file):
        raise SystemExit(f"{path} was built from another {pairs_file.name}; delete it to rebuild")
    if (pairs_file is None) != (corpus["pairs_sha256"] is None):
        raise SystemExit(f"{path} was built {'with' if corpus['pairs_sha256'] else 'without'} word pairs "
                         f"but --pairs is {'not ' if pairs_file is None else ''}given: pass another --corpus")
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
    pairs = [d for d in corpus["documents"] if d.get("source") == "pairs"]
    if pairs:
        stats["train"]["pair_documents"] = {"files": len(pairs), "chars": sum(len(d["text"]) for d in pairs),
                                            "tokens": sum(d["num_tokens"] for d in pairs)}
        stats["translation"] = {k: v for k, v in corpus["translation"].items() if k not in ("heldout", "memory")}
    return stats


# ----- outputs ----------------------------------------------------------------------------------------------

def save_sharded(model: GLM, out: Path, iteration: int) -> None:
    """fp16 weights as NUM_SHARDS SAT shards, as scripts/make_demo_model.py writes them."""
    state = {name: tensor.detach().to("cpu", torch.float16) for name, tensor in model.state_dict().items()}
    shards = [{name: split_tensor(name, t, rank, NUM_SHARDS).clone() for name, t in state.items()}
              for rank in range(NUM_SHARDS)]
    model_config = {**dataclasses.asdict(model.config), "model_parallel_size": NUM_SHARDS}
    save_checkpoint(out, shards, iteration=iteration, model_config=model_config)


# ----- training, or a finished run's printed log --------------------------------------------------------------

def train_run(args, corpus: dict, tokenizer: GLMTokenizer, model_config, objective, settings, lm_batches,
              unigram_ppl: float, device: torch.device, checkpoint_dir: Path) -> dict:
    """Train a fresh model, write its shards; the records and facts of the run."""
    train_corpus, heldout = split_corpus(corpus, "train"), split_corpus(corpus, "heldout")
    blank_objective = dataclasses.replace(objective, gmask_fraction=0.0)
    blank_batches = [make_batch(heldout, tokenizer, blank_objective, args.batch_rows, EVAL_SEED, i)
                     for i in range(args.eval_blank_batches)]
    model = GLM(model_config)
    init_weights(model, args.seed)
    model.to(device)
    print(f"model {args.config}{' (overridden)' if args.overridden else ''}: {model_config.num_parameters():,} "
          f"parameters; device {device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}")
    trained = torch.compile(model) if args.compile else model

    def evaluate_fn() -> dict:
        lm = evaluate(trained, lm_batches, device)
        metrics = {"eval_loss": lm.loss, "heldout_perplexity": lm.perplexity,
                   "ratio_to_unigram": lm.perplexity / unigram_ppl}
        if blank_batches:
            metrics["heldout_blank_loss"] = evaluate(trained, blank_batches, device).loss
        return metrics

    def on_record(record: dict) -> None:
        if line := format_record(record):  # every record is in training_log.json; evaluations and a heartbeat
            print(line, flush=True)

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
    args.out.mkdir(parents=True, exist_ok=True)
    save_sharded(model, checkpoint_dir, iteration=steps)
    return {"records": records, "steps": steps, "train_seconds": train_seconds, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "data_workers": workers, "command": " ".join(sys.argv)}


def printed_run(args, model_config) -> dict:
    """The run behind --evaluate's checkpoint: its printed records (--train-log) and step count."""
    if args.train_log is None or not args.train_log.is_file():
        raise SystemExit(f"--evaluate needs --train-log, the training run's console output "
                         f"(got {args.train_log}): its records make the log and the curve")
    try:
        info = inspect_checkpoint(args.evaluate)
        printed = parse_train_log(args.train_log.read_text())
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"--evaluate: {error}") from None
    found = {k: v for k, v in (info.model_config or {}).items() if k in dataclasses.asdict(model_config)}
    differ = {k: (v, getattr(model_config, k)) for k, v in found.items() if v != getattr(model_config, k)}
    if differ:
        raise SystemExit(f"{args.evaluate}/model_config.json does not match the flags given "
                         f"({', '.join(f'{k}: {a} there, {b} here' for k, (a, b) in differ.items())}): "
                         f"pass the training run's --config/--num-layers/... flags")
    records, steps = printed["records"], int(info.iteration)
    if max(r["step"] for r in records) != steps:
        raise SystemExit(f"{args.train_log} ends at step {max(r['step'] for r in records)} but {args.evaluate} "
                         f"is iteration {steps}: not the log of this checkpoint")
    # The training command is this one without the evaluation's own flags (--out is not in the log).
    argv, skip = sys.argv[1:], {"--evaluate", "--train-log", "--out", "--device", "--eval-windows", "--eval-pairs"}
    kept = [a for i, a in enumerate(argv) if a not in skip and (i == 0 or argv[i - 1] not in skip)]
    kept = ["--device", printed["device"], *kept] if printed["device"] else kept
    return {"records": records, "steps": steps, "train_seconds": max(r.get("elapsed_s", 0) for r in records),
            "device": printed["device"], "device_name": printed["device_name"], "torch": None,
            "data_workers": None, "command": " ".join(["scripts/train_demo_model.py", *kept]),
            "records_note": "the records the run printed (every evaluation, a heartbeat every 500 steps, parsed "
                            f"from {args.train_log.name}); eval_loss and the 25-step records were not printed",
            "evaluated_by": " ".join(sys.argv) + f"  (device {args.device}, torch {torch.__version__})"}


# ----- evaluation and outputs ---------------------------------------------------------------------------------

def finish(args, run: dict, corpus: dict, stats: dict, tokenizer: GLMTokenizer, config, model_config, objective,
           settings, lm_samples, lm_batches, heldout_tokens, unigram_ppl: float, device, checkpoint_dir: Path) -> None:
    """Reload the shards, generate, score code and translation (and the shipped model), write the log."""
    tokenizer_file = args.tokenizer / MODEL_FILE
    size = sum(p.stat().st_size for p in checkpoint_dir.rglob("*") if p.is_file())
    kit = config.replace(model=model_config, checkpoint=checkpoint_dir.resolve(), tokenizer=args.tokenizer.resolve(),
                         dtype="fp32", device=str(device))
    reloaded = load_model(kit)
    lm = evaluate(reloaded, lm_batches, device)  # the written shards through the inference path
    pipeline = GLMPipeline(reloaded, tokenizer, kit)
    samples = sample_prompts(pipeline)
    code = {"heldout_nats_per_char": nats_per_char(lm, lm_samples, tokenizer)}
    translation = score_translation(pipeline, corpus["translation"], args.eval_pairs) if "translation" in corpus else None
    baseline = (score_baseline(split_corpus(corpus, "heldout").texts, corpus.get("translation"), args.batch_rows,
                               args.eval_windows, args.eval_pairs, device) if args.baseline else None)
    final = next(r for r in reversed(run["records"]) if "heldout_perplexity" in r)
    result = {"heldout_perplexity": final["heldout_perplexity"], "unigram_perplexity": unigram_ppl,
              "ratio": final["heldout_perplexity"] / unigram_ppl, "reloaded_fp16_perplexity": lm.perplexity,
              "heldout_scored_tokens": len(heldout_tokens), "steps": run["steps"],
              "train_seconds": run["train_seconds"], "checkpoint_bytes": size,
              "tokenizer_bytes": tokenizer_file.stat().st_size, "samples": samples,
              **code, "translation": translation, "baseline": baseline}
    recipe = {"command": run["command"], "config_name": config.name, "model": dataclasses.asdict(model_config),
              "objective": dataclasses.asdict(objective), "training": dataclasses.asdict(settings),
              "batch_rows": args.batch_rows, "seed": args.seed, "device": run["device"],
              "device_name": run["device_name"], "torch": run["torch"], "python": sys.version.split()[0],
              "corpus": stats, "data_workers": run["data_workers"],
              "eval": {"windows": len(lm_samples), "blank_batches": args.eval_blank_batches, "eval_seed": EVAL_SEED},
              "tokenizer": str(args.tokenizer), "tokenizer_sha256": _sha256(tokenizer_file),
              "reproduce": run["command"].split(" ", 1)[-1] + f" --steps {run['steps']}  (bitwise only on CPU: "
                           f"CUDA kernels such as the embedding backward are not deterministic)"}
    if "evaluated_by" in run:
        recipe["evaluated_by"] = run["evaluated_by"]
    log = {"recipe": recipe, "records": run["records"], "result": result,
           "unigram_counts": corpus["unigram_counts"]}  # install_demo_model.py writes unigram_counts.json
    if "records_note" in run:
        log["records_note"] = run["records_note"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    plot(log, args.out / "training_curve.png")

    for sample in samples:
        print(f"--- {sample['prompt']!r} ->\n{sample['text']}")
    print(f"\nwrote {args.out / 'training_log.json'}, {args.out / 'training_curve.png'}; checkpoint {checkpoint_dir} "
          f"({size / 1e6:.1f} MB in {NUM_SHARDS} fp16 shards, iteration {run['steps']})")
    print(f"trained {run['steps']} steps in {run['train_seconds'] / 60:.1f} min on {run['device_name']}")
    print(f"held-out perplexity ({len(lm_samples)} windows): model {result['heldout_perplexity']:.2f} (reloaded fp16 "
          f"shards {lm.perplexity:.2f}), unigram {unigram_ppl:.2f}, ratio {result['ratio']:.3f} (target <= 0.333); "
          f"{code['heldout_nats_per_char']:.4f} nats per character")
    if translation:
        print(f"held-out translation ({translation['count']} pairs, notebook 03's prompt, stop '\\n'): exact "
              f"{translation['exact']:.1%}, any dictionary translation {translation['accepted']:.1%}; training "
              f"pairs: exact {translation['memory']['exact']:.1%}")
        for row in translation["rows"][:12]:
            print(f"  {row['english']!r:24} -> {row['answer']!r:24} (dictionary: {row['german']!r})")
        for demo in translation["without_stop"]:
            print(f"  without stop: {demo['english']!r} -> {demo['completion']!r} ({demo['finish_reason']})")
    if baseline:
        found = baseline.get("translation")
        print(f"shipped demo model: {baseline['heldout_perplexity']:.2f} token perplexity with its tokenizer, "
              f"{baseline['heldout_nats_per_char']:.4f} nats per character"
              + (f"; translation exact {found['exact']:.1%}, first answers {found['first_answers'][:3]}" if found else ""))


# ----- main -------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "artifacts" / "glm-tiny-trained",
                   help="output folder: checkpoint/, training_log.json, training_curve.png")
    p.add_argument("--evaluate", type=Path, metavar="CHECKPOINT",
                   help="do not train: evaluate this run's checkpoint folder and write --out's log and curve "
                        "(with --train-log and the training run's flags)")
    p.add_argument("--train-log", type=Path, help="with --evaluate: the training run's console output")
    p.add_argument("--corpus", type=Path, help="corpus file, built here if missing (default: "
                   f"{CORPUS_FILE.relative_to(REPO_ROOT)}, or {MIXED_CORPUS_FILE.name} beside it with --pairs)")
    p.add_argument("--pairs", type=Path, help="word-pairs file of scripts/make_word_pairs.py to train on too")
    p.add_argument("--pair-share", type=float, default=0.3, help="share of training characters that are pairs")
    p.add_argument("--phrase-share", type=float, default=0.1,
                   help="share of the pair documents' blocks that are example phrases rather than headwords")
    p.add_argument("--eval-pairs", type=int, help="held-out pairs scored (default: all)")
    p.add_argument("--baseline", action="store_true", help="also score the shipped demo model (demo/)")
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
    if args.corpus is None:
        args.corpus = MIXED_CORPUS_FILE if args.pairs else CORPUS_FILE
    if args.plot_only:
        log = json.loads(args.plot_only.read_text())
        plot(log, args.plot_only.with_name("training_curve.png"))
        return
    tokenizer_file = args.tokenizer / MODEL_FILE
    tokenizer = GLMTokenizer.load(args.tokenizer)
    if args.corpus.is_file():
        corpus = load_corpus(args.corpus, tokenizer_file, args.pairs)
    else:
        t0 = time.perf_counter()
        if args.pairs is not None and not args.pairs.is_file():
            raise SystemExit(f"--pairs {args.pairs} does not exist: make it with scripts/make_word_pairs.py")
        corpus = build_corpus(tokenizer, tokenizer_file, args.pairs, args.pair_share, args.phrase_share, args.seed)
        save_corpus(corpus, args.corpus)
        print(f"built {args.corpus} from Python {corpus['python']}'s stdlib in {time.perf_counter() - t0:.0f} s "
              f"({args.corpus.stat().st_size / 1e6:.1f} MB)")
    stats = corpus_stats(corpus)
    for split in ("train", "heldout"):
        print(f"corpus {split:8s} {stats[split]['files']:5d} files {stats[split]['chars'] / 1e6:6.1f} M chars "
              f"{stats[split]['tokens'] / 1e6:6.2f} M tokens")
    if "translation" in stats:
        pairs = stats["train"]["pair_documents"]
        print(f"  of which {pairs['files']} pair documents, {pairs['chars'] / 1e6:.1f} M chars, "
              f"{pairs['tokens'] / 1e6:.2f} M tokens; {stats['translation']['train_pairs']} training pairs, "
              f"{len(corpus['translation']['heldout'])} held out")
    if args.build_corpus_only:
        return

    checkpoint_dir = args.evaluate or args.out / "checkpoint"
    if not args.evaluate and checkpoint_dir.exists():
        raise SystemExit(f"{checkpoint_dir} exists; choose another --out or delete it (or pass --evaluate "
                         f"{checkpoint_dir} to evaluate it)")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    config = load_config(args.config)
    overrides = {k: v for k, v in (("num_layers", args.num_layers), ("hidden_size", args.hidden_size),
                                   ("num_attention_heads", args.num_attention_heads),
                                   ("inner_hidden_size", args.inner_hidden_size)) if v is not None}
    args.overridden = bool(overrides)
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

    # Fixed held-out [gMASK] windows tiling the held-out files (perplexity).
    lm_samples, lm_batches = heldout_batches(split_corpus(corpus, "heldout"), tokenizer, objective.sequence_length,
                                             args.batch_rows, args.eval_windows)
    # The baseline: an add-one unigram over every id text can produce (all but the image ids).
    unigram = unigram_log_probs({int(k): v for k, v in corpus["unigram_counts"].items()},
                                range(NUM_IMAGE_TOKENS, tokenizer.num_tokens))
    heldout_tokens = scored_tokens(lm_batches)
    unigram_ppl = perplexity(unigram, heldout_tokens)
    print(f"held-out: {len(lm_samples)} [gMASK] windows, {len(heldout_tokens)} scored tokens; "
          f"unigram perplexity {unigram_ppl:.1f}")
    if args.evaluate:
        run = printed_run(args, model_config)
    else:
        run = train_run(args, corpus, tokenizer, model_config, objective, settings, lm_batches, unigram_ppl,
                        device, checkpoint_dir)
    finish(args, run, corpus, stats, tokenizer, config, model_config, objective, settings, lm_samples, lm_batches,
           heldout_tokens, unigram_ppl, device, checkpoint_dir)

if __name__ == "__main__":
    main()
