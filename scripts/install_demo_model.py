"""Install a finished demo-model run (the --out folder of scripts/train_demo_model.py) into the repo.

Copies <out>/checkpoint to demo/glm-tiny (replacing it), the tokenizer the run used (its path and sha256
are in training_log.json; the GPU run does not send it back) to demo/tokenizer, and training_log.json,
training_curve.png, train.log and evaluate.log (the console output of an --evaluate run, if any) to
docs/demo-model/, with unigram_counts.json written from the log.

    python scripts/install_demo_model.py OUT [--demo demo] [--docs docs/demo-model]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

from glmkit.config import REPO_ROOT
from glmkit.tokenizer import MODEL_FILE


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def install(out: Path, demo: Path, docs: Path) -> None:
    """Copy a finished run (its --out folder) into `demo` (checkpoint, tokenizer) and `docs` (log, curve)."""
    log_file = out / "training_log.json"
    if not log_file.is_file():
        raise SystemExit(f"{out}: no training_log.json there (the --out folder of a finished run)")
    log = json.loads(log_file.read_text())
    tokenizer_file = Path(log["recipe"]["tokenizer"]) / MODEL_FILE
    if not tokenizer_file.is_absolute():
        tokenizer_file = REPO_ROOT / tokenizer_file
    if not tokenizer_file.is_file() or _sha256(tokenizer_file) != log["recipe"]["tokenizer_sha256"]:
        raise SystemExit(f"{out}: {tokenizer_file} is missing or is not the tokenizer the run used")
    checkpoint = out / "checkpoint"
    target = demo / "glm-tiny"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(checkpoint, target)
    (demo / "tokenizer").mkdir(parents=True, exist_ok=True)
    if tokenizer_file.resolve() != (demo / "tokenizer" / MODEL_FILE).resolve():  # a run on the shipped one
        shutil.copyfile(tokenizer_file, demo / "tokenizer" / MODEL_FILE)
    docs.mkdir(parents=True, exist_ok=True)
    for name in ("training_log.json", "training_curve.png", "train.log", "evaluate.log"):
        if (out / name).is_file():
            shutil.copyfile(out / name, docs / name)
    about = ("add-one unigram baseline counts: token id -> count over the demo corpus' training files "
             f"(scripts/train_demo_model.py, Python {log['recipe']['corpus']['python']} stdlib)")
    (docs / "unigram_counts.json").write_text(json.dumps({"about": about, "counts": log["unigram_counts"]}))
    print(f"installed {checkpoint} -> {target}, {tokenizer_file} -> {demo / 'tokenizer'}, logs -> {docs}; "
          f"configs/glm-tiny.yaml still describes the model: check its comment and vocab_size")


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and install."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="the --out folder of a finished training run")
    p.add_argument("--demo", type=Path, default=REPO_ROOT / "demo")
    p.add_argument("--docs", type=Path, default=REPO_ROOT / "docs" / "demo-model")
    args = p.parse_args(argv)
    install(args.out, args.demo, args.docs)


if __name__ == "__main__":
    main()
