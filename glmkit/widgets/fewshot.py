"""The few-shot tool: edit a template, preview the exact prompt and its tokens, run queries into a table."""
from __future__ import annotations

import ipywidgets as w
import pandas as pd

from ..generate.sampling import GenerationSettings
from ._base import Tool, backend_lock, error_html, info_html, labelled
from .render import BOX, esc, escape_text, tokens_html, unescape, visible_whitespace_html
from .templates import RESULT_COLUMNS, Example, FewShotTemplate, load_template, shipped_templates

CUSTOM = "(custom)"
_ESCAPED_FIELDS = ("prefix_separator", "field_separator", "example_separator")
_SHOWN_COLUMNS = ["query", "answer", "finish_reason", "tokens", "seconds"]


class FewShot(Tool):
    """Few-shot prompting over any backend with `.tokenizer` and `.generate(...)`.

    `template` reads the edited template (a `FewShotTemplate`); `set_template()` loads one; `run()` (the
    Run button) answers every query line in the background into `results`, a DataFrame. Extra keyword
    arguments are generation settings passed to every call (greedy, 32 new tokens unless given).
    """

    def __init__(self, backend, template: FewShotTemplate | str | None = "en-de-translation",
                 queries: list[str] | str = (), **generation):
        super().__init__()
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.generation = dict(generation)
        self.results = pd.DataFrame(columns=RESULT_COLUMNS)
        self._rows: list[dict] = []
        self._loading = True  # no previews until the first template is in

        # Labels are 11em wide, enough for the longest ("between examples") at JupyterLab's font size, and
        # every control is wide enough for its own text: nothing is cut off with an ellipsis.
        label = "11em"
        self._shipped = {name: load_template(name).to_dict() for name in shipped_templates()}
        self.picker = labelled(w.Dropdown(options=[CUSTOM] + list(self._shipped), value=CUSTOM,
                                          layout=w.Layout(width="26em")), "shipped template", width=label)
        self.path = w.Text(placeholder="path/to/template.yaml", layout=w.Layout(width="22em"))
        self.load_button = w.Button(description="Load", icon="folder-open")
        self.save_button = w.Button(description="Save", icon="save")
        text = dict(continuous_update=True)
        short = dict(layout=w.Layout(width="24em"), **text)
        self.fields: dict[str, w.Widget] = {
            "name": labelled(w.Text(**short), "name", width=label),
            "description": labelled(w.Text(layout=w.Layout(width="44em"), **text), "description", width=label),
            "instruction": labelled(w.Textarea(placeholder="optional: a line before the examples",
                                               layout=w.Layout(width="99%"), **text), "instruction", width=label),
            "input_prefix": labelled(w.Text(**short), "input prefix", "e.g. English:", label),
            "output_prefix": labelled(w.Text(**short), "output prefix", "e.g. German:", label),
            "prefix_separator": labelled(w.Text(**short), "after prefix", "escaped: \\s space, \\n newline",
                                         label),
            "field_separator": labelled(w.Text(**short), "input→output", "escaped, e.g. \\n", label),
            "example_separator": labelled(w.Text(**short), "between examples", "escaped, e.g. \\n or \\n\\n",
                                          label),
            "mask": labelled(w.Dropdown(options=[("none ([gMASK] appended)", ""), ("[MASK]", "[MASK]"),
                                                 ("[sMASK]", "[sMASK]"), ("[gMASK]", "[gMASK]")],
                                        layout=w.Layout(width="26em")),
                             "mask after prefix", width=label),
            "trailing_space": w.Checkbox(False, indent=False, layout=w.Layout(width="auto"),
                                         description="end the prompt with the separator (a trailing space)"),
            "derive_stops": w.Checkbox(True, indent=False, layout=w.Layout(width="auto"),
                                       description="stop before the next example"),
            "stop": labelled(w.Textarea(placeholder="one per line, escaped (\\n newline, \\s space)",
                                        layout=w.Layout(width="99%", height="3.5em"), **text),
                             "extra stops", width=label),
        }
        self.examples_box = w.VBox()
        self._example_rows: list[tuple[w.Textarea, w.Textarea, w.HBox]] = []
        self.add_example_button = w.Button(description="add example", icon="plus")
        self.queries = w.Textarea(placeholder="queries, one per line (the first is previewed)",
                                  layout=w.Layout(width="100%", height="5em"), **text)
        self.max_new_tokens = labelled(w.IntText(self.generation.pop("max_new_tokens", 32)),
                                       "max new tokens", width="9em")
        self.preview = w.HTML()
        self.preview_tokens = w.HTML()
        self.stops_view = w.HTML()
        self.run_button = w.Button(description="Run", button_style="primary", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.results_view = w.HTML()

        refresh = self._guarded(lambda _: self.refresh())
        for widget in list(self.fields.values()) + [self.queries]:
            widget.observe(refresh, "value")
        self.picker.observe(self._guarded(self._on_pick), "value")
        self.load_button.on_click(self._guarded(lambda _: self.load(self.path.value.strip())))
        self.save_button.on_click(self._guarded(lambda _: self.save(self.path.value.strip())))
        self.add_example_button.on_click(self._guarded(lambda _: (self._add_example_row("", ""),
                                                                  self.refresh())))
        self.run_button.on_click(self._guarded(lambda _: self.run()))
        self.stop_button.on_click(self._guarded(lambda _: self.stop()))

        f = self.fields
        preview = w.Accordion([self.preview, self.preview_tokens], titles=("prompt", "tokens"),
                              selected_index=0)
        wrap = dict(layout=w.Layout(flex_flow="row wrap"))  # narrow windows wrap a row instead of cutting it
        self._finish([
            w.HBox([self.picker, self.path, self.load_button, self.save_button], **wrap),
            w.HBox([f["name"], f["description"]], **wrap), f["instruction"],
            w.HBox([f["input_prefix"], f["output_prefix"]], **wrap),
            w.HBox([f["prefix_separator"], f["field_separator"], f["example_separator"]], **wrap),
            w.HBox([f["mask"], f["trailing_space"], f["derive_stops"]], **wrap), f["stop"],
            w.HTML("<b>examples</b> (input, output)"), self.examples_box, self.add_example_button,
            w.HTML("<b>queries</b>"), self.queries,
            preview, self.stops_view,
            w.HBox([self.run_button, self.stop_button, self.max_new_tokens]), self.results_view])
        if isinstance(queries, str):
            queries = [queries]
        self.queries.value = "\n".join(queries)
        if template is not None:
            self.set_template(load_template(template) if isinstance(template, str) else template)
        else:
            self.set_template(FewShotTemplate())

    # ----- the template -----------------------------------------------------------------------------

    @property
    def template(self) -> FewShotTemplate:
        """The template as currently edited (TemplateError names a bad field)."""
        values = {name: widget.value for name, widget in self.fields.items()}
        for name in _ESCAPED_FIELDS:
            values[name] = unescape(values[name])
        values["mask"] = values["mask"] or None
        values["stop"] = [unescape(line) for line in values["stop"].split("\n") if line]
        values["examples"] = [Example(a.value, b.value) for a, b, _ in self._example_rows]
        return FewShotTemplate(**values)

    def set_template(self, template: FewShotTemplate) -> None:
        """Show a template in the editor."""
        self._loading = True
        try:
            for name, widget in self.fields.items():
                value = getattr(template, name)
                if name in _ESCAPED_FIELDS:
                    value = escape_text(value)
                elif name == "stop":
                    value = "\n".join(escape_text(s) for s in value)
                elif name == "mask":
                    value = value or ""
                widget.value = value
            for _, _, row in list(self._example_rows):
                self._remove_example_row(row)
            for example in template.examples:
                self._add_example_row(example.input, example.output)
        finally:
            self._loading = False
        self.refresh()

    def load(self, name_or_path: str) -> None:
        """Load a shipped template by name, or a YAML file."""
        if not name_or_path:
            raise ValueError("enter a template path (or a shipped name) to load")
        self.set_template(load_template(name_or_path))
        self.status.value = info_html(f"loaded {name_or_path}")

    def save(self, path: str) -> None:
        """Save the edited template as YAML."""
        if not path:
            raise ValueError("enter a path to save the template to, e.g. my-template.yaml")
        written = self.template.save(path)
        self.status.value = info_html(f"saved to {written}")

    def _on_pick(self, change) -> None:
        if change["new"] != CUSTOM:
            self.set_template(load_template(change["new"]))

    def _match_picker(self, template: FewShotTemplate) -> None:
        # The picker names the shipped template the editor holds, and says (custom) once it is edited.
        data = template.to_dict()
        self.picker.value = next((name for name, shipped in self._shipped.items() if shipped == data), CUSTOM)

    def _add_example_row(self, source: str, target: str) -> None:
        area = dict(continuous_update=True, layout=w.Layout(width="45%", height="3.5em"))
        a, b = w.Textarea(source, placeholder="input", **area), w.Textarea(target, placeholder="output", **area)
        remove = w.Button(icon="trash", tooltip="remove this example", layout=w.Layout(width="3em"))
        row = w.HBox([a, b, remove])
        refresh = self._guarded(lambda _: self.refresh())
        a.observe(refresh, "value")
        b.observe(refresh, "value")
        remove.on_click(self._guarded(lambda _: (self._remove_example_row(row), self.refresh())))
        self._example_rows.append((a, b, row))
        self.examples_box.children = [r for _, _, r in self._example_rows]

    def _remove_example_row(self, row: w.HBox) -> None:
        self._example_rows = [item for item in self._example_rows if item[2] is not row]
        self.examples_box.children = [r for _, _, r in self._example_rows]
        for child in row.children:
            child.close()
        row.close()

    def query_list(self) -> list[str]:
        """The non-empty query lines."""
        return [line for line in self.queries.value.split("\n") if line.strip()]

    # ----- preview ----------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Rebuild the prompt preview, its tokens and the stop sequences from the editor."""
        if self._loading:
            return
        try:
            template = self.template
            queries = self.query_list()
            prompt = template.build_prompt(queries[0] if queries else "")
        except ValueError as error:  # mid-typing states are common: show, don't log a traceback
            self.preview.value = error_html(str(error))
            self.preview_tokens.value = self.stops_view.value = ""
            return
        self._match_picker(template)
        tokens = self.tokenizer.tokens(prompt)
        self.preview.value = (f'<div style="{BOX};border:1px solid #ddd;padding:4px">'
                              f'{visible_whitespace_html(prompt)}</div>'
                              + info_html(f"{len(tokens)} tokens, {len(prompt)} characters; ↵ newline, "
                                          f"· trailing or repeated space"))
        self.preview_tokens.value = tokens_html(tokens)
        stops = template.stop_sequences()
        shown = ", ".join(f"<code>{esc(repr(s))}</code>" for s in stops) or "none"
        self.stops_view.value = f"stop sequences: {shown}"

    # ----- running ----------------------------------------------------------------------------------

    def generation_kwargs(self) -> dict:
        """Keyword arguments for each generate() call (without the stop sequences)."""
        return {**self.generation, "max_new_tokens": self.max_new_tokens.value}

    def run(self) -> None:
        """Answer every query in the background (what the Run button does); rows appear as they finish."""
        checked = self._begin(self._checked_request)
        if checked is None:
            return
        template, queries, kwargs = checked
        self._rows = []
        self.results_view.value = ""
        self.status.value = info_html(f"running {len(queries)} queries…")
        self._set_running(True)

        def on_row(row: dict) -> None:
            self._rows.append(row)
            self._show_rows()
            self.status.value = info_html(f"{len(self._rows)} of {len(queries)} done…")

        def work(abort) -> None:
            template.run(self.backend, queries, should_abort=abort.is_set, on_row=on_row, **kwargs)
            aborted = " (stopped)" if abort.is_set() else ""
            self.status.value = info_html(f"{len(self._rows)} of {len(queries)} queries answered{aborted}")

        def done() -> None:
            self.results = pd.DataFrame(self._rows, columns=RESULT_COLUMNS)
            self._set_running(False)

        self._start(work, backend_lock(self.backend), on_done=done)

    def _checked_request(self) -> tuple[FewShotTemplate, list[str], dict]:
        """(template, queries, generate() kwargs), each prompt built once so bad input fails before any run."""
        template = self.template
        queries = self.query_list()
        if not queries:
            raise ValueError("enter at least one query (one per line)")
        kwargs = self.generation_kwargs()
        GenerationSettings.from_kwargs(**kwargs, stop=template.stop_sequences())
        for query in queries:
            template.build_prompt(query)
        return template, queries, kwargs

    def _show_rows(self) -> None:
        frame = pd.DataFrame(self._rows, columns=RESULT_COLUMNS)[_SHOWN_COLUMNS]
        table = frame.to_html(index=False, escape=True)
        self.results_view.value = f'<div style="white-space: pre-wrap">{table}</div>'

    def _set_running(self, running: bool) -> None:
        self.run_button.disabled = running
        self.stop_button.disabled = not running
