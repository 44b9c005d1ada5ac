"""GLM-130B task YAMLs (THUDM/GLM-130B `tasks/*/*.yaml`, read by its evaluation/configs.py) as glmkit Tasks.

What is read, as GLM-130B reads it:
  name, type        `mul` (multiple choice) or `gen` (generation); `lm` and other types are refused
  path              the data folder: relative to `data_root` when given (GLM-130B's DATA_PATH), else to
                    the YAML's own folder
  file_pattern      one glob (group "all"; default "**/*.json*") or a mapping group -> glob; each file of a
                    group is one prompt of its examples (GLM-130B reports max / median / average over them);
                    a group named "train" is glmkit's k-shot pool, never evaluated
  use_task_mask     [gMASK] instead of [MASK] after a context without a mask
  unidirectional    causal attention over the context (needs use_task_mask, as in GLM-130B)
  max_seq_length    checked against the model's own length (GLM-130B cuts the context from the left to fit;
                    glmkit refuses an example that does not fit instead, naming it)
  gen only:         sampling_strategy (BaseStrategy = greedy, BeamSearchStrategy = beams), num_beams,
                    length_penalty, no_repeat_ngram_size (beams only, as GLM-130B), min_gen_length,
                    max_gen_length
  glmkit's own:     stop (a list of stop strings for generation)
Keys are read with '-' and '_' alike (GLM-130B's files mix `file-pattern` and `max_seq-length`). `module`
(a custom Python task class), `metrics`, `micro_batch_size` and other keys are noted and otherwise ignored.
"""
from __future__ import annotations

import glob
from pathlib import Path

import yaml

from .tasks import Task, TaskError, build_rows, read_jsonl

_GEN_KEYS = {"sampling_strategy", "num_beams", "length_penalty", "no_repeat_ngram_size", "min_gen_length",
             "max_gen_length"}
_KNOWN = {"name", "type", "path", "file_pattern", "use_task_mask", "unidirectional", "max_seq_length", "stop"} \
    | _GEN_KEYS
_NOTED = {"module", "metrics", "micro_batch_size", "use_multitask_encoding", "no_tokenized", "save_prediction"}


def read_config(path: Path) -> dict:
    """The YAML's keys, '-' read as '_'; TaskError for what is not a mapping or misses name/type/path."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise TaskError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise TaskError(f"{path}: a task YAML must be a mapping of keys, got {type(data).__name__}")
    config = {}
    for key, value in data.items():
        normal = str(key).replace("-", "_").lower()
        if normal in config:
            raise TaskError(f"{path}: key {key!r} is given twice (as '-' and '_')")
        config[normal] = value
    for key in ("name", "type", "path"):
        if key not in config:
            raise TaskError(f"{path}: key {key!r} is missing (GLM-130B's task YAMLs need name, type and path)")
    if config["type"] not in ("mul", "gen"):
        raise TaskError(f"{path}: type {config['type']!r} is not supported: glmkit evaluates 'mul' (multiple "
                        f"choice) and 'gen' (generation) tasks")
    return config


def _flag(config: dict, key: str, path: Path) -> bool:
    value = config.get(key, False)
    if not isinstance(value, bool):
        raise TaskError(f"{path}: {key} must be true or false, got {value!r}")
    return value


def _number(config: dict, key: str, path: Path, default, kind=int):
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise TaskError(f"{path}: {key} must be a{'' if kind is float else 'n integer'} number, got {value!r}")
    return value


def generation_settings(config: dict, path: Path) -> dict:
    """The generate() settings of a `gen` task's keys (GenerationTaskConfig's defaults where absent)."""
    strategy = config.get("sampling_strategy", "BaseStrategy")
    settings = {"max_new_tokens": _number(config, "max_gen_length", path, 128),
                "min_new_tokens": _number(config, "min_gen_length", path, 0)}
    if strategy == "BeamSearchStrategy":
        settings.update(num_beams=_number(config, "num_beams", path, 4),
                        length_penalty=_number(config, "length_penalty", path, 1.0, float),
                        no_repeat_ngram_size=_number(config, "no_repeat_ngram_size", path, 3))
    elif strategy != "BaseStrategy":  # BaseStrategy(temperature=1, top_k=1) in GLM-130B: greedy
        raise TaskError(f"{path}: sampling_strategy must be BaseStrategy or BeamSearchStrategy, got {strategy!r}")
    return settings


def file_groups(config: dict, base: Path, path: Path) -> dict[str, list[Path]]:
    """Group name -> the data files its pattern matches under `base`, sorted (as GLM-130B globs them)."""
    patterns = config.get("file_pattern", "**/*.json*")
    if isinstance(patterns, str):
        patterns = {"all": patterns}
    if not isinstance(patterns, dict) or not patterns or not all(isinstance(v, str) for v in patterns.values()):
        raise TaskError(f"{path}: file_pattern must be a glob or a mapping of group names to globs, got {patterns!r}")
    if not base.is_dir():
        raise TaskError(f"{path}: data folder {str(base)!r} (path {config['path']!r}) does not exist; "
                        f"pass data_root= the folder GLM-130B's DATA_PATH names")
    groups = {}
    for group, pattern in patterns.items():
        files = sorted(Path(p) for p in glob.glob(str(base / pattern), recursive=True) if Path(p).is_file())
        if not files:
            raise TaskError(f"{path}: file_pattern {group!r}: {pattern!r} matches no file under {base}")
        groups[str(group)] = files
    return groups


def from_glm130b_yaml(path: Path, *, kind: str | None = None, name: str | None = None,
                      data_root: str | Path | None = None, **options) -> Task:
    """A Task from a GLM-130B task YAML and the jsonl files its path and file_pattern name."""
    path = Path(path)
    config = read_config(path)
    if kind is not None and kind != config["type"]:
        raise TaskError(f"{path}: kind={kind!r} given, but the task's type is {config['type']!r}")
    base = Path(data_root).expanduser() / config["path"] if data_root is not None else path.parent / config["path"]
    records = []
    for group, files in file_groups(config, base, path).items():
        for file in files:
            relative = file.relative_to(base).as_posix()
            prompt = relative.rsplit(".", 1)[0]
            for where, record in read_jsonl(file, relative):
                if group == "train" and isinstance(record, dict):
                    record = {**record, "split": "train"}
                records.append((where, group, prompt, record))
    rows, kind = build_rows(records, config["type"], str(path))
    unknown = sorted(set(config) - _KNOWN - _NOTED)
    notes = tuple(f"{key}: {config[key]!r} is not used by glmkit" for key in sorted(set(config) & _NOTED)) + \
        ((f"unknown keys {unknown} ignored",) if unknown else ())
    settings = generation_settings(config, path) if kind == "gen" else {}
    stop = config.get("stop", ())
    if isinstance(stop, str):
        stop = (stop,)
    max_seq = _number(config, "max_seq_length", path, 2048)
    task = dict(use_task_mask=_flag(config, "use_task_mask", path), unidirectional=_flag(config, "unidirectional", path),
                generation={**settings, **options.pop("generation", {})}, stop=tuple(stop) if stop else ())
    task.update(options)
    return Task(name or str(config["name"]), kind, rows, source=str(path), notes=notes, max_seq_length=max_seq, **task)
