"""Few-shot prompt templates: build the prompt, derive stop sequences, run queries, save and load YAML.

Plain Python (no widgets): `FewShotTemplate` is what the FewShot widget edits, and works on its own:

    t = load_template("en-de-translation")
    t.build_prompt("house")        # 'Translate English to German.\\nEnglish: cheese\\n…English: house\\nGerman:'
    t.stop_sequences()             # ['\\nEnglish:'] — the model stops before inventing the next example
    t.run(glm, ["house", "dog"])   # a DataFrame of answers
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import yaml

from ..config import CONFIG_DIR
from ..generate.blanks import MASK_PATTERN

TEMPLATE_DIR = CONFIG_DIR / "templates"
RESULT_COLUMNS = ["query", "answer", "completion", "finish_reason", "tokens", "seconds", "prompt"]
_MASKS = ("[MASK]", "[sMASK]", "[gMASK]")


class TemplateError(ValueError):
    """A few-shot template field is missing, mistyped or unusable; the message names the field."""


@dataclass
class Example:
    """One demonstration: an input and the output the model should imitate."""

    input: str
    output: str


@dataclass
class FewShotTemplate:
    """An instruction, example pairs and input/output prefixes that turn a query into a GLM prompt.

    Layout (`sep` = prefix_separator, written after a non-empty prefix):
        instruction <example_separator>
        input_prefix sep input <field_separator> output_prefix sep output <example_separator>   (per example)
        input_prefix sep query <field_separator> output_prefix [sep if trailing_space] [mask]
    Without `mask`, GLM appends [gMASK] and continues left to right; stop sequences end the answer.
    `trailing_space` is off by default: SentencePiece glues a space to the next word, so a prompt ending
    in "German: " ends on a lone "▁" token the examples never showed (one of GLM's prompt quirks).
    """

    name: str = "untitled"
    description: str = ""
    instruction: str = ""
    input_prefix: str = "Input:"
    output_prefix: str = "Output:"
    prefix_separator: str = " "
    field_separator: str = "\n"
    example_separator: str = "\n"
    examples: list[Example] = field(default_factory=list)
    trailing_space: bool = False
    mask: str | None = None
    derive_stops: bool = True
    stop: list[str] = field(default_factory=list)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.type == "str":
                _require_str(f.name, getattr(self, f.name))
        for name in ("trailing_space", "derive_stops"):
            if not isinstance(getattr(self, name), bool):
                raise TemplateError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not self.example_separator:
            raise TemplateError("example_separator must not be empty (it separates the examples, "
                                "e.g. '\\n' or '\\n\\n')")
        if self.mask is not None and self.mask not in _MASKS:
            raise TemplateError(f"mask must be one of {list(_MASKS)} or null, got {self.mask!r}")
        self.examples = [_to_example(i, e) for i, e in enumerate(_require_list("examples", self.examples))]
        self.stop = list(_require_list("stop", self.stop))
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not s:
                raise TemplateError(f"stop[{i}] must be a non-empty string, got {s!r}")
        for name in ("instruction", "input_prefix", "output_prefix", "prefix_separator",
                     "field_separator", "example_separator"):
            _no_mask_text(name, getattr(self, name))
        for i, e in enumerate(self.examples):
            _no_mask_text(f"examples[{i}].input", e.input)
            _no_mask_text(f"examples[{i}].output", e.output)

    # ----- prompts --------------------------------------------------------------------------------

    def _prefixed(self, prefix: str, text: str) -> str:
        return f"{prefix}{self.prefix_separator}{text}" if prefix else text

    def format_example(self, example: Example) -> str:
        """One demonstration block."""
        return (self._prefixed(self.input_prefix, example.input) + self.field_separator
                + self._prefixed(self.output_prefix, example.output))

    def format_query(self, query: str) -> str:
        """The final block: the query and the output prefix the model continues from."""
        _require_str("query", query)
        _no_mask_text("query", query)
        tail = self.output_prefix + (self.prefix_separator if self.trailing_space else "")
        return self._prefixed(self.input_prefix, query) + self.field_separator + tail + (self.mask or "")

    def build_prompt(self, query: str) -> str:
        """The exact prompt for `query`: instruction, examples, then the query block."""
        blocks = ([self.instruction] if self.instruction else []) + \
            [self.format_example(e) for e in self.examples] + [self.format_query(query)]
        return self.example_separator.join(blocks)

    def stop_sequences(self) -> list[str]:
        """Where the answer ends: before the next example's input prefix, and at the example separator
        when no example output contains it; then any extra `stop` strings."""
        stops: list[str] = []
        if self.derive_stops:
            head = self.input_prefix.rstrip()
            if head:
                stops += [self.example_separator + head, self.field_separator + head]
            if not any(self.example_separator in e.output for e in self.examples):
                stops.append(self.example_separator)
        stops += self.stop
        return [s for i, s in enumerate(stops) if s and s not in stops[:i]]

    @staticmethod
    def answer(completion: str) -> str:
        """The answer in a completion: the generated text without surrounding whitespace."""
        return completion.strip()

    def _generate_answer(self, backend, prompt: str, stops: list[str],
                         should_abort: Callable[[], bool] | None, **kwargs):
        """(completion, finish_reason, result) for one prompt; the answer starts after leading separators.

        A model often opens its answer with a separator itself (the demo model writes "\n\n" after
        "Python:"), and a whitespace-only stop such as "\n\n" would end it at once, empty. So only stops
        with visible text go to the generation; whitespace-only ones are watched in the stream and end the
        generation once the answer has begun, i.e. after its first non-whitespace character.
        """
        watch = _AnswerStops([s for s in stops if not s.strip()])
        visible = [s for s in stops if s.strip()]
        user_on_text = kwargs.pop("on_text", None)

        def abort() -> bool:
            return watch.hit or (should_abort is not None and should_abort())

        def on_text(event) -> None:
            watch(event)
            if user_on_text is not None:
                user_on_text(event)

        result = backend.generate(prompt, should_abort=abort, stop=visible, on_text=on_text, **kwargs)
        if isinstance(result, list):
            result = result[0]
        completion, cut = watch.cut(result.completion)
        reason = "stop" if cut else result.finish_reason
        return completion, reason, result

    def run(self, backend, queries: list[str], *, use_stops: bool = True,
            should_abort: Callable[[], bool] | None = None,
            on_row: Callable[[dict], None] | None = None, **kwargs) -> pd.DataFrame:
        """Generate an answer for each query, one after another, into a DataFrame (RESULT_COLUMNS)."""
        if isinstance(queries, str):
            queries = [queries]
        stops = kwargs.pop("stop", None) or []
        stops = [stops] if isinstance(stops, str) else list(stops)
        if use_stops:
            stops = self.stop_sequences() + [s for s in stops if s not in self.stop_sequences()]
        prompts = [self.build_prompt(q) for q in queries]  # every query validated before any compute
        rows = []
        for query, prompt in zip(queries, prompts):
            if should_abort is not None and should_abort():
                break
            started = time.perf_counter()
            completion, reason, result = self._generate_answer(backend, prompt, stops, should_abort, **kwargs)
            row = {"query": query, "answer": self.answer(completion), "completion": completion,
                   "finish_reason": reason, "tokens": result.num_generated_tokens,
                   "seconds": round(time.perf_counter() - started, 3), "prompt": prompt}
            rows.append(row)
            if on_row is not None:
                on_row(row)
        return pd.DataFrame(rows, columns=RESULT_COLUMNS)

    # ----- YAML -----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Plain data (what the YAML file holds)."""
        data = dataclasses.asdict(self)
        data["examples"] = [{"input": e.input, "output": e.output} for e in self.examples]
        return data

    @classmethod
    def from_dict(cls, data) -> "FewShotTemplate":
        """Build from plain data, naming unknown or mistyped fields."""
        if not isinstance(data, dict):
            raise TemplateError(f"a template must be a mapping of fields, got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise TemplateError(f"unknown template fields {unknown}; known: {known}")
        data = dict(data)
        if data.get("stop") is None:
            data.pop("stop", None)
        if data.get("examples") is None:
            data.pop("examples", None)
        return cls(**data)

    def to_yaml(self) -> str:
        """YAML text; multi-line strings are written as literal blocks so code stays readable."""
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)

    @classmethod
    def from_yaml(cls, text: str) -> "FewShotTemplate":
        """Parse YAML text written by `to_yaml` (or by hand)."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise TemplateError(f"not valid YAML: {error}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        """Write the template as YAML; returns the path."""
        path = Path(path).expanduser()
        path.write_text(self.to_yaml(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FewShotTemplate":
        """Read a YAML template file."""
        path = Path(path).expanduser()
        try:
            return cls.from_yaml(path.read_text(encoding="utf-8"))
        except TemplateError as error:
            raise TemplateError(f"{path}: {error}") from None


def shipped_templates() -> list[str]:
    """Names of the templates shipped in configs/templates/."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.yaml"))


def load_template(name_or_path: str | Path) -> FewShotTemplate:
    """A shipped template by name (e.g. 'en-de-translation') or a YAML file by path."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return FewShotTemplate.load(path)
    shipped = TEMPLATE_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return FewShotTemplate.load(shipped)
    raise FileNotFoundError(f"no template file {str(name_or_path)!r} and no shipped template of that name; "
                            f"shipped: {shipped_templates()}")


# ----- helpers ----------------------------------------------------------------------------------------

class _AnswerStops:
    """Watches streamed text for whitespace-only stops, counting only text after the answer has begun."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.text = ""
        self.hit = False

    def __call__(self, event) -> None:
        self.text += event.text
        self.hit = self.hit or self._stop_at(self.text) is not None

    def _stop_at(self, text: str) -> int | None:
        lead = len(text) - len(text.lstrip())  # the separators the model opened its answer with
        found = [i for i in (text.find(s, lead) for s in self.stops) if i >= 0]
        return min(found) if found and text[lead:] else None

    def cut(self, completion: str) -> tuple[str, bool]:
        """The completion up to the first stop after the answer began, and whether one was found."""
        at = self._stop_at(completion)
        return (completion, False) if at is None else (completion[:at], True)


class _Dumper(yaml.SafeDumper):
    pass


def _represent_str(dumper, value: str):
    # Literal blocks keep multi-line code readable; PyYAML itself falls back to quotes when a block
    # cannot round-trip (trailing spaces, control characters). Whitespace-only separators such as
    # "\n" are double-quoted so the escape is visible.
    style = None
    if "\n" in value:
        style = "|" if value.strip() else '"'
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def _require_str(name: str, value) -> None:
    if not isinstance(value, str):
        raise TemplateError(f"{name} must be a string, got {type(value).__name__} {value!r}")


def _require_list(name: str, value) -> list:
    if not isinstance(value, (list, tuple)):
        raise TemplateError(f"{name} must be a list, got {type(value).__name__} {value!r}")
    return list(value)


def _no_mask_text(name: str, text: str) -> None:
    found = MASK_PATTERN.search(text)
    if found:
        raise TemplateError(f"{name} contains {found.group()!r}, which GLM would treat as a blank to fill; "
                            f"reword it")


def _to_example(index: int, item) -> Example:
    if isinstance(item, Example):
        value = item
    elif isinstance(item, dict):
        keys = set(item)
        if keys != {"input", "output"}:
            raise TemplateError(f"examples[{index}] must have exactly the keys input and output, "
                                f"got {sorted(keys)}")
        value = Example(item["input"], item["output"])
    elif isinstance(item, (list, tuple)) and len(item) == 2:
        value = Example(*item)
    else:
        raise TemplateError(f"examples[{index}] must be a mapping with input and output, got {item!r}")
    _require_str(f"examples[{index}].input", value.input)
    _require_str(f"examples[{index}].output", value.output)
    return value
