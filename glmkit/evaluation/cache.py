"""The evaluation cache: what the model returned for one prompt, keyed by everything that decides it.

A key is the SHA-256 of the model's identity (its run config and checkpoint files, or a `model_id` given
by the caller), the kind of call (scoring or generation), the exact prompt (which holds the row's context,
the template and the k demonstrations the seed drew), the choices or the generation settings and stops,
and the scoring options. So a re-run of the same task rows, template, k, seed and options is served from
the cache, and an interrupted run resumes where it stopped. Metrics are recomputed from what is stored (the
gold answers are not part of the key). Entries live in memory and, with a folder, in one jsonl file there,
appended as each example finishes (a line cut short by a crash is skipped when it is read back).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

CACHE_VERSION = 1
CACHE_FILE = "glmkit-eval-cache.jsonl"


class EvalCache:
    """Model outputs by key, in memory and optionally in `folder` (kept across sessions)."""

    def __init__(self, folder: str | Path | None = None):
        self.entries: dict[str, dict] = {}
        self.path = None
        self.hits = self.misses = 0
        if folder is not None:
            folder = Path(folder).expanduser()
            folder.mkdir(parents=True, exist_ok=True)
            self.path = folder / CACHE_FILE
            if self.path.is_file():
                self._read()

    def _read(self) -> None:
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                self.entries[entry["key"]] = entry["value"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short when a run was killed while writing it

    def get(self, key: str) -> dict | None:
        """The stored value, or None (counting hits and misses)."""
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, value: dict) -> None:
        """Store a value (and append it to the cache file)."""
        self.entries[key] = value
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "value": value}) + "\n")

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"EvalCache({len(self)} entries{f', {self.path}' if self.path else ''})"


def _files_fingerprint(folder) -> list:
    """(relative path, size, mtime) of the files in a checkpoint or tokenizer folder: a new file is a new model."""
    if folder is None:
        return []
    folder = Path(folder).expanduser()
    if folder.is_file():
        stat = folder.stat()
        return [[folder.name, stat.st_size, stat.st_mtime_ns]]
    if not folder.is_dir():
        return ["absent"]  # e.g. engines on another host: the config alone identifies the model
    return [[p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(folder.rglob("*")) if p.is_file()]


def model_identity(backend, model_id: str | None = None) -> str | None:
    """What names the model behind `backend`: `model_id` if given, else its run config (a KitConfig) with
    its checkpoint and tokenizer files; None when the backend has no config (then nothing is cached)."""
    if model_id is not None:
        if not isinstance(model_id, str) or not model_id:
            raise TypeError(f"model_id must be a non-empty string, got {model_id!r}")
        return f"id:{model_id}"
    config = getattr(backend, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        return None
    fields = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    files = {"checkpoint": _files_fingerprint(getattr(config, "checkpoint", None)),
             "tokenizer": _files_fingerprint(getattr(config, "tokenizer", None))}
    return json.dumps({"config": fields, "files": files}, sort_keys=True)


def unit_key(identity: str, call: dict) -> str:
    """The cache key of one model call (`call`: the kind, prompt, choices or settings, options)."""
    text = json.dumps({"version": CACHE_VERSION, "model": identity, **call}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
