"""Write the shipped evaluation tasks from the Python standard library's source, by fixed rules; one command.

    python scripts/make_eval_tasks.py [--out configs/tasks]

Every item comes from a rule over the stdlib's source (Python 3.11.7, the demo model's corpus); none is
chosen by asking a model. Contexts are at most 90 tokens of the demo tokenizer, so that a 4-shot prompt
(five contexts) fits the demo model's 512 positions. The demo model's 60 held-out files (docs/demo-model/training_log.json) are used
first; where they hold too few items of a kind, training files fill up the rest, in a fixed order (the
SHA-256 of the item's id), and each item says which (`source`: heldout or train).

Multiple choice (configs/tasks/stdlib-mc/, GLM-130B's `type: mul`), the blank is a `[MASK]` in the code:
  import_module  `from [MASK] import NAMES` with the statement's neighbouring lines; the true module and
                 three others that are common `from X import` modules of the stdlib, never one that any
                 stdlib file imports one of NAMES from, nor one of the true module's top-level package.
  first_param    a method's first parameter (`def name([MASK], ...)`) under its class line and decorators,
                 with two body lines; choices self, cls and one more name (the true one when it is neither).
                 Half the items are `self`, half are not (classmethods, staticmethods, __new__ ...).
Generation (configs/tasks/stdlib-completion/, `type: gen`), greedy, stop at a space or newline (each answer
is one name), exact match:
  import_name    `import [MASK]` where a line at most 12 lines below uses `NAME.attribute`.
  loop_variable  `for [MASK] in ...:` where one of the next three body lines uses the variable.
  self_assign    `self.attr = [MASK]` in an `__init__` whose parameter it is, with the lines above it.
Every kind but first_param (whose answers are self and cls by design) has at most 3 items with the same
answer, so no one answer (`unittest`, `i`) stands for the kind.

Also written: configs/tasks/lm-eval/*.yaml, the same data as lm-evaluation-harness tasks (the `json` dataset
builder on the jsonl files above; paths relative to the repository root, where lm_eval must run).
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import re
import sys
import sysconfig
from collections import Counter, defaultdict
from pathlib import Path

from glmkit.config import REPO_ROOT, load_config
from glmkit.generate.blanks import check_masks
from glmkit.tokenizer import GLMTokenizer

EXCLUDED_DIRS = {"site-packages", "dist-packages", "encodings", "__pycache__"}  # as train_demo_model.py
TRAINING_LOG = REPO_ROOT / "docs" / "demo-model" / "training_log.json"
MASK = "[MASK]"
MAX_LINE = 100  # longer lines make long prompts: k-shot prompts must fit the demo model's 512 positions
MAX_TOKENS = 90  # a context's tokens (demo tokenizer): a 4-shot prompt (five contexts) then fits 512
COUNTS = {"import_module": 150, "first_param": 60, "import_name": 34, "loop_variable": 33, "self_assign": 33}
MIN_MODULE_USES = 20  # a distractor module is one that at least this many stdlib `from X import` lines name
PER_ANSWER = 3  # items of a kind with the same answer, at most (test files import unittest and _testcapi a lot)


def stdlib_sources(heldout: set[str]) -> list[tuple[str, list[str], ast.Module, str]]:
    """(path, lines, tree, split) of every parsable stdlib file, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                   if not EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1]))
    files = []
    for rel in found:
        text = (root / rel).read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        files.append((rel, text.split("\n"), tree, "heldout" if rel in heldout else "train"))
    return files


def order(item_id: str) -> str:
    return hashlib.sha256(item_id.encode()).hexdigest()


def clean(lines: list[str]) -> str | None:
    """The context text of source lines holding one [MASK], or None when a line is too long or the source
    itself holds a mask or a look-alike of one."""
    while lines and not lines[0].strip():
        lines = lines[1:]
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    if any(len(line) > MAX_LINE for line in lines):
        return None
    text = "\n".join(lines)
    try:
        if check_masks(text) != [MASK] or "\ufffd" in text:
            return None
    except ValueError:  # a mask look-alike such as "[mask]"
        return None
    return text


def blank_line(line: str, pattern: str) -> str | None:
    """`line` with the pattern's group `x` replaced by [MASK] (exactly once), or None if it does not match."""
    found = re.fullmatch(pattern, line)
    if found is None:
        return None
    return line[:found.start("x")] + MASK + line[found.end("x"):]


# ----- multiple choice -------------------------------------------------------------------------------------

def import_sources(files) -> tuple[dict[str, set[str]], Counter]:
    """Which modules each name is imported from anywhere in the stdlib, and how often each module is."""
    providers: dict[str, set[str]] = defaultdict(set)
    uses: Counter = Counter()
    for _, _, tree, _ in files:
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                uses[node.module] += 1
                for alias in node.names:
                    providers[alias.name].add(node.module)
    return providers, uses


def import_module_items(files) -> list[dict]:
    providers, uses = import_sources(files)
    common = sorted(m for m, n in uses.items() if n >= MIN_MODULE_USES and m != "__future__")
    items, seen = [], set()
    for path, lines, tree, split in files:
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module) \
                    or node.module == "__future__" or node.lineno != node.end_lineno:
                continue
            names = tuple(a.name for a in node.names)
            if "*" in names or (node.module, names) in seen:
                continue
            i = node.lineno - 1
            line = blank_line(lines[i], rf"\s*from\s+(?P<x>{re.escape(node.module)})\s+import\s.*")
            context = line and clean(lines[max(0, i - 2):i] + [line] + lines[i + 1:i + 3])
            if not context:
                continue
            top = node.module.split(".")[0]
            allowed = [m for m in common if m.split(".")[0] != top
                       and not any(m in providers.get(n, ()) for n in names)]
            item_id = f"import_module:{path}:{node.lineno}"
            rng = random.Random(item_id)
            if len(allowed) < 3:
                continue
            choices = rng.sample(allowed, 3) + [node.module]
            rng.shuffle(choices)
            seen.add((node.module, names))
            items.append({"inputs_pretokenized": context, "choices_pretokenized": choices,
                          "label": choices.index(node.module), "id": item_id, "kind": "import_module",
                          "source": split, "path": path, "line": node.lineno})
    return items


def _methods(tree):
    for cls in ast.walk(tree):
        if isinstance(cls, ast.ClassDef):
            for fn in cls.body:
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and (fn.args.posonlyargs + fn.args.args):
                    yield cls, fn


def first_param_items(files) -> list[dict]:
    items = []
    for path, lines, tree, split in files:
        methods = list(_methods(tree))
        fillers = sorted({a.arg for _, fn in methods for a in (fn.args.posonlyargs + fn.args.args)[1:2]}
                         - {"self", "cls"})
        for cls, fn in methods:
            first = (fn.args.posonlyargs + fn.args.args)[0].arg
            if not lines[cls.lineno - 1].rstrip().endswith(":"):
                continue  # a class header over several lines
            d = fn.lineno - 1
            line = blank_line(lines[d], rf"\s*(?:async\s+)?def\s+{re.escape(fn.name)}\s*\(\s*(?P<x>{first})\b.*")
            if line is None:
                continue
            start = min([x.lineno for x in fn.decorator_list] + [fn.lineno]) - 1
            body = lines[d + 1:min(d + 3, fn.end_lineno)]
            context = clean([lines[cls.lineno - 1]] + lines[start:d] + [line] + body)
            if not context:
                continue
            item_id = f"first_param:{path}:{fn.lineno}"
            rng = random.Random(item_id)
            third = first if first not in ("self", "cls") else \
                (rng.choice(fillers) if fillers else "obj")
            choices = ["self", "cls", third]
            rng.shuffle(choices)
            items.append({"inputs_pretokenized": context, "choices_pretokenized": choices,
                          "label": choices.index(first), "id": item_id, "kind": "first_param",
                          "source": split, "path": path, "line": fn.lineno})
    return items


# ----- generation ------------------------------------------------------------------------------------------

def gen_item(kind: str, path: str, line: int, split: str, context: str, target: str) -> dict:
    return {"inputs_pretokenized": context, "targets_pretokenized": [target], "id": f"{kind}:{path}:{line}",
            "kind": kind, "source": split, "path": path, "line": line}


def import_name_items(files) -> list[dict]:
    items = []
    for path, lines, tree, split in files:
        for node in tree.body:
            if not (isinstance(node, ast.Import) and len(node.names) == 1 and node.names[0].asname is None):
                continue
            name, i = node.names[0].name, node.lineno - 1
            line = blank_line(lines[i], rf"import\s+(?P<x>{re.escape(name)})\s*")
            use = re.compile(rf"(?<![\w.]){re.escape(name)}\.\w")
            for j in range(i + 1, min(len(lines), i + 13)):
                if use.search(lines[j]) and not lines[j].lstrip().startswith(("import ", "from ", "#")):
                    before = lines[i - 1:i] if i and lines[i - 1].startswith(("import ", "from ")) else []
                    context = line and clean(before + [line] + lines[i + 1:j + 1])
                    if context:
                        items.append(gen_item("import_name", path, node.lineno, split, context, name))
                    break
    return items


def loop_variable_items(files) -> list[dict]:
    items = []
    for path, lines, tree, split in files:
        for node in ast.walk(tree):
            if not (isinstance(node, (ast.For, ast.AsyncFor)) and isinstance(node.target, ast.Name)):
                continue
            name, i = node.target.id, node.lineno - 1
            line = blank_line(lines[i], rf"\s*(?:async\s+)?for\s+(?P<x>{re.escape(name)})\s+in\s.*:\s*(#.*)?")
            body = lines[i + 1:min(i + 4, node.end_lineno)]
            if line is None or not any(re.search(rf"\b{re.escape(name)}\b", b) for b in body):
                continue
            context = clean([line] + body)
            if context:
                items.append(gen_item("loop_variable", path, node.lineno, split, context, name))
    return items


def self_assign_items(files) -> list[dict]:
    items = []
    for path, lines, tree, split in files:
        for fn in ast.walk(tree):
            if not (isinstance(fn, ast.FunctionDef) and fn.name == "__init__"):
                continue
            params = {a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs} - {"self"}
            d = fn.lineno - 1
            if not re.fullmatch(r"\s*def __init__\(.*\):\s*", lines[d]):
                continue
            for stmt in fn.body:
                if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and stmt.lineno <= fn.lineno + 6
                        and isinstance(stmt.value, ast.Name) and stmt.value.id in params
                        and isinstance(stmt.targets[0], ast.Attribute)
                        and isinstance(stmt.targets[0].value, ast.Name) and stmt.targets[0].value.id == "self"):
                    continue
                i, name = stmt.lineno - 1, stmt.value.id
                line = blank_line(lines[i], rf"\s*self\.\w+\s*=\s*(?P<x>{re.escape(name)})\s*")
                after = lines[i + 1:i + 2] if fn.end_lineno > stmt.lineno else []
                context = line and clean(lines[d:i] + [line] + after)
                if context:
                    items.append(gen_item("self_assign", path, stmt.lineno, split, context, name))
    return items


def pick(items: list[dict], count: int, per_answer: int | None = None) -> list[dict]:
    """`count` items: held-out ones first, then training ones, each in the order of their ids' hashes; at most
    `per_answer` with the same answer."""
    ranked = sorted(items, key=lambda it: (it["source"] != "heldout", order(it["id"])))
    answers: Counter = Counter()
    chosen = []
    for item in ranked:
        answer = item["choices_pretokenized"][item["label"]] if "label" in item else item["targets_pretokenized"][0]
        if per_answer is None or answers[answer] < per_answer:
            answers[answer] += 1
            chosen.append(item)
    return chosen[:count]


def pick_first_params(items: list[dict], count: int) -> list[dict]:
    """Half `self` (held-out first), half any other first parameter (held-out first)."""
    own = pick([it for it in items if it["choices_pretokenized"][it["label"]] == "self"], count // 2)
    return own + pick([it for it in items if it["choices_pretokenized"][it["label"]] != "self"], count - count // 2)


# ----- files -----------------------------------------------------------------------------------------------

def write_jsonl(path: Path, items: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for item in sorted(items, key=lambda it: order(it["id"])):
            f.write(json.dumps(item, ensure_ascii=False) + "\n")


MC_YAML = """\
# GLM-130B task format (THUDM/GLM-130B evaluation/): written by scripts/make_eval_tasks.py, do not edit.
# Standard-library facts as multiple choice; the [MASK] in each context is the blank a choice fills.
name: stdlib-mc
type: mul
path: .
file-pattern:
  import_module: import_module.jsonl
  first_param: first_param.jsonl
"""
GEN_YAML = """\
# GLM-130B task format (THUDM/GLM-130B evaluation/): written by scripts/make_eval_tasks.py, do not edit.
# Code completions: greedy (BaseStrategy) generation of the [MASK] blank; `stop` is glmkit's own key.
# Every answer is one name, so generation stops at a space or a newline (the demo model, trained on blanks of
# about three words, otherwise runs on past the name: "pattern in pattern").
name: stdlib-completion
type: gen
path: .
file-pattern:
  import_name: import_name.jsonl
  loop_variable: loop_variable.jsonl
  self_assign: self_assign.jsonl
sampling_strategy: BaseStrategy
max_gen_length: 8
stop: [" ", "\\n"]
"""
LM_EVAL_MC = """\
# lm-evaluation-harness task: written by scripts/make_eval_tasks.py. Run lm_eval from the repository root
# (data_files are relative to it). Contexts hold a [MASK] that the choice fills (GLM-130B's convention), so
# the choice follows with no delimiter; few-shot examples are other items with their blank filled in.
task: glmkit_stdlib_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test:
{files}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: inputs_pretokenized
doc_to_choice: choices_pretokenized
doc_to_target: label
target_delimiter: ""
fewshot_delimiter: "\\n\\n"
fewshot_config:
  sampler: default
  doc_to_text: ""
  doc_to_target: "{{{{inputs_pretokenized | replace('[MASK]', choices_pretokenized[label])}}}}"
  target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
LM_EVAL_GEN = """\
# lm-evaluation-harness task: written by scripts/make_eval_tasks.py. Run lm_eval from the repository root
# (data_files are relative to it). Contexts hold a [MASK]: the generation fills it (GLM-130B's convention).
task: glmkit_stdlib_completion
dataset_path: json
dataset_kwargs:
  data_files:
    test:
{files}
test_split: test
fewshot_split: test
output_type: generate_until
doc_to_text: inputs_pretokenized
doc_to_target: "{{{{targets_pretokenized[0]}}}}"
target_delimiter: ""
fewshot_delimiter: "\\n\\n"
fewshot_config:
  sampler: default
  doc_to_text: ""
  doc_to_target: "{{{{inputs_pretokenized | replace('[MASK]', targets_pretokenized[0])}}}}"
  target_delimiter: ""
generation_kwargs:
  until: [" ", "\\n"]
  max_gen_toks: 8
  do_sample: false
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def main(argv: list[str] | None = None) -> None:
    """Build the tasks and print how many items of each kind (and from held-out files) were written."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "configs" / "tasks")
    args = p.parse_args(argv)
    recipe = json.loads(TRAINING_LOG.read_text())["recipe"]
    python = sys.version.split()[0]
    if python != recipe["corpus"]["python"]:
        raise SystemExit(f"run this with Python {recipe['corpus']['python']} (the demo model's stdlib), not {python}")
    files = stdlib_sources(set(recipe["corpus"]["heldout"]["paths"]))
    tokenizer = GLMTokenizer.load(load_config("glm-tiny").tokenizer)

    def short(items: list[dict]) -> list[dict]:
        return [it for it in items if len(tokenizer.encode_with_masks(it["inputs_pretokenized"])) <= MAX_TOKENS]

    chosen = {
        "import_module": pick(short(import_module_items(files)), COUNTS["import_module"], PER_ANSWER),
        "first_param": pick_first_params(short(first_param_items(files)), COUNTS["first_param"]),
        "import_name": pick(short(import_name_items(files)), COUNTS["import_name"], PER_ANSWER),
        "loop_variable": pick(short(loop_variable_items(files)), COUNTS["loop_variable"], PER_ANSWER),
        "self_assign": pick(short(self_assign_items(files)), COUNTS["self_assign"], PER_ANSWER),
    }
    layout = {"stdlib-mc": ["import_module", "first_param"],
              "stdlib-completion": ["import_name", "loop_variable", "self_assign"]}
    for task, kinds in layout.items():
        for kind in kinds:
            write_jsonl(args.out / task / f"{kind}.jsonl", chosen[kind])
            held = sum(it["source"] == "heldout" for it in chosen[kind])
            print(f"{task}/{kind}.jsonl: {len(chosen[kind])} items, {held} from held-out files")
    (args.out / "stdlib-mc" / "stdlib-mc.yaml").write_text(MC_YAML)
    (args.out / "stdlib-completion" / "stdlib-completion.yaml").write_text(GEN_YAML)
    lm_eval = args.out / "lm-eval"
    lm_eval.mkdir(parents=True, exist_ok=True)
    for name, text, task in (("glmkit_stdlib_mc", LM_EVAL_MC, "stdlib-mc"),
                             ("glmkit_stdlib_completion", LM_EVAL_GEN, "stdlib-completion")):
        folder = (args.out / task).resolve()
        rel = (folder.relative_to(REPO_ROOT.resolve()) if folder.is_relative_to(REPO_ROOT.resolve()) else folder).as_posix()
        listed = "\n".join(f"      - {rel}/{kind}.jsonl" for kind in layout[task])
        (lm_eval / f"{name}.yaml").write_text(text.format(files=listed))


if __name__ == "__main__":
    main()
