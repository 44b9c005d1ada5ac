"""Named playground presets in a YAML file: a preset is a name and the playground's settings (not the prompt).

The file is plain YAML a person can edit:

    presets:
      short-greedy: {strategy: greedy, max_new_tokens: 8, stop: ["\\n"]}
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import ipywidgets as w
import yaml

from ._base import info_html, labelled

DEFAULT_PRESETS_PATH = Path("~/.glmkit/presets.yaml")
_NAME = re.compile(r"[\w.+-][\w .+-]*")


def check_preset_name(name: str) -> str:
    """The name stripped; ValueError unless it is a word of letters, digits, spaces, '.', '+', '-', '_'."""
    name = name.strip()
    if not _NAME.fullmatch(name):
        raise ValueError(f"preset name must be letters, digits, spaces, '.', '+', '-' or '_', got {name!r}")
    return name


class PresetStore:
    """The presets of one YAML file; every call re-reads the file, so two playgrounds can share it."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path if path not in (None, "") else DEFAULT_PRESETS_PATH).expanduser()

    def read(self) -> dict[str, dict]:
        """Every preset, by name ({} when the file does not exist yet)."""
        if not self.path.exists():
            return {}
        try:
            raw = yaml.safe_load(self.path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{self.path} is not valid YAML ({error}): fix or remove the file") from None
        presets = raw.get("presets", {}) if isinstance(raw, dict) else None
        if not isinstance(presets, dict) or not all(isinstance(v, dict) for v in presets.values()):
            raise ValueError(f"{self.path}: expected 'presets:' mapping each name to its settings")
        return {str(name): dict(values) for name, values in presets.items()}

    def names(self) -> list[str]:
        """Preset names, sorted."""
        return sorted(self.read())

    def get(self, name: str) -> dict:
        """One preset's settings; ValueError naming the saved presets when there is none of that name."""
        presets = self.read()
        if name not in presets:
            raise ValueError(f"no preset {name!r} in {self.path}; saved presets: {sorted(presets) or 'none'}")
        return presets[name]

    def save(self, name: str, settings: dict) -> None:
        """Add or replace a preset; the file (and its folder) are created when missing."""
        name = check_preset_name(name)
        presets = self.read()
        presets[name] = dict(settings)
        self._write(presets)

    def delete(self, name: str) -> None:
        """Remove a preset (ValueError when there is none of that name)."""
        self.get(name)
        presets = self.read()
        del presets[name]
        self._write(presets)

    def _write(self, presets: dict[str, dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump({"presets": presets}, sort_keys=True, allow_unicode=True)
        # Write a sibling file, then rename: a crash mid-write never leaves a half-written presets file.
        fd, tmp = tempfile.mkstemp(prefix=".presets-", suffix=".yaml", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, self.path)


class PresetsBar:
    """The presets row of a tool: the file, a name (typed or picked) and Save / Load buttons.

    `get_settings()` gives what Save writes, `apply(values)` is what Load does, `guard` wraps callbacks so
    errors are shown by the tool, and `on_names(names)` hears the saved names whenever they are re-read.
    """

    def __init__(self, path, get_settings, apply, guard, status: w.HTML, on_names=None):
        self.get_settings, self.apply, self.status, self.on_names = get_settings, apply, status, on_names
        self.path = labelled(w.Text(str(PresetStore(path).path)), "presets file", width="7em")
        self.path.layout.width = "34em"
        self.name = labelled(w.Combobox(placeholder="a name", ensure_option=False), "preset",
                             "type a new name to save, or pick a saved one to load", width="4em")
        self.name.layout.width = "18em"
        self.save_button = w.Button(description="Save preset", icon="save")
        self.load_button = w.Button(description="Load preset", icon="folder-open")
        self.save_button.on_click(guard(lambda _: self.save(self.name.value)))
        self.load_button.on_click(guard(lambda _: self.load(self.name.value)))
        self.path.observe(guard(lambda _: self.refresh()), "value")
        self.root = w.HBox([self.path, self.name, self.save_button, self.load_button],
                           layout=w.Layout(grid_gap="6px"))
        self.refresh()

    def store(self) -> PresetStore:
        """The store of the file named in the path box."""
        return PresetStore(self.path.value.strip() or None)

    def save(self, name: str) -> None:
        """Save the tool's current settings as `name`."""
        store = self.store()
        store.save(name, self.get_settings())
        self.refresh()
        self.status.value = info_html(f"saved preset {name.strip()!r} to {store.path}")

    def load(self, name: str) -> None:
        """Apply the preset `name` to the tool."""
        store = self.store()
        self.apply(store.get(name.strip()))
        self.status.value = info_html(f"loaded preset {name.strip()!r} from {store.path}")

    def refresh(self) -> None:
        """Re-read the saved names (a broken file is reported when used, not while typing its path)."""
        try:
            names = self.store().names()
        except ValueError:
            names = []
        self.name.options = names
        if self.on_names is not None:
            self.on_names(names)


__all__ = ["PresetsBar", "PresetStore", "DEFAULT_PRESETS_PATH", "check_preset_name"]
