"""The prompt playground: edit a prompt and the generation settings, stream the output, keep a history."""
from __future__ import annotations

import json
import re
import time

import ipywidgets as w
import pandas as pd

from ..generate.blanks import MASK_PATTERN, GenerationResult, TextEvent, plan_prompt
from ..generate.sampling import GenerationSettings
from ._base import LockPair, Tool, backend_lock, error_html, info_html, labelled
from .code import cli_line, python_code
from .compare import compare_html, describe_id_divergence, first_id_divergence, generated_ids
from .history import HISTORY_COLUMNS, HistoryPanel, Run
from .presets import PresetsBar
from .render import (Segment, escape_text, esc, generation_html, logprob_table_html, round_trip_warnings,
                     unescape)

STRATEGIES = ("greedy", "sampling", "beam")
SAME_SETTINGS = "same settings as A"
STOP_HINT = ("One stop sequence per line; generation ends before it. Escapes: <code>\\n</code> newline, "
             "<code>\\t</code> tab, <code>\\s</code> space (trailing spaces are invisible), "
             "<code>\\\\</code> backslash. Example: <code>\\nEnglish:</code>")
# Which settings each strategy uses; the others are greyed out and not sent.
_STRATEGY_FIELDS = {"greedy": (), "sampling": ("temperature", "top_k", "top_p", "seed"),
                    "beam": ("num_beams", "length_penalty")}
TOP_ALTERNATIVES = 5


def parse_stop_lines(text: str) -> list[str]:
    """Stop sequences from a textarea: one per non-empty line, with escapes applied."""
    return [unescape(line) for line in text.split("\n") if line]


def kwargs_for(settings: dict) -> dict:
    """The `generate()` keyword arguments of a playground settings dict (`Playground.settings()`)."""
    kwargs = {name: settings[name] for name in ("max_new_tokens", "min_new_tokens", "no_repeat_ngram_size",
                                                "repetition_penalty", "frequency_penalty",
                                                "presence_penalty")}
    if settings["stop"]:
        kwargs["stop"] = list(settings["stop"])
    strategy = settings["strategy"]
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if strategy == "sampling":
        kwargs.update(do_sample=True, temperature=settings["temperature"], top_k=settings["top_k"],
                      top_p=settings["top_p"])
        if settings["seed"] is not None:
            kwargs["seed"] = settings["seed"]
    elif strategy == "beam":
        kwargs.update(num_beams=settings["num_beams"], length_penalty=settings["length_penalty"])
    if settings["show_probabilities"]:
        kwargs.update(logprobs=True, top_logprobs=TOP_ALTERNATIVES)
    GenerationSettings.from_kwargs(**kwargs)  # same validation the backend applies, before any work
    return kwargs


def describe_backend(backend) -> str:
    """A short name for a backend: its config name, dtype and quantization."""
    config = getattr(backend, "config", None)
    if config is None:
        return type(backend).__name__
    return " ".join(str(v) for v in (config.name, config.dtype, config.quantization) if v)


def prompt_token_summary(tokenizer, prompt: str) -> str:
    """HTML saying how many tokens a prompt is, alone and with the mask/eos/sop tokens GLM adds."""
    try:
        plan = plan_prompt(tokenizer, prompt, max_sequence_length=1 << 30)
    except ValueError as error:
        return error_html(str(error))
    own = len(tokenizer.encode_with_masks(prompt))
    added = ["[gMASK]"] if plan.appended_gmask else []
    if len(plan.tokens) - own - len(added) == 1:
        added.append("eos")
    added.append("sop")
    summary = info_html(f"{own} prompt tokens; {len(plan.tokens) + 1} with the {' + '.join(added)} GLM adds")
    warnings = round_trip_warnings(tokenizer.tokens(prompt))
    if warnings:
        summary += "<br>" + "<br>".join(error_html(x.message()).replace("Error:", "Note:") for x in warnings)
    return summary


class Playground(Tool):
    """Prompt playground over any backend with `.tokenizer` and `.generate(prompt, on_text=, should_abort=)`.

    `controls` maps each generation setting name to its widget; `generate()` (the Generate button) runs
    in the background; `history` is a DataFrame of past runs and `load_run()` puts one back. "View code"
    shows the Python call and command line of the current settings; presets are saved by name in a YAML
    file (`presets_path`, default ~/.glmkit/presets.yaml). Compare mode runs the prompt a second time,
    under a preset's settings or on `second_backend` (e.g. the same model at another precision), and
    marks the first generated token where the two differ.
    """

    # Seconds between streamed re-renders: a small CPU model emits hundreds of tokens a second, and
    # each render resends the whole output to the browser. The final render always happens.
    render_interval = 0.05

    def __init__(self, backend, prompt: str = "", *, second_backend=None, presets_path=None, **settings):
        super().__init__()
        self.backend = backend
        self.second_backend = second_backend
        self.tokenizer = backend.tokenizer
        self.result: GenerationResult | None = None
        self.compared: GenerationResult | None = None
        self._blanks: list[list[Segment]] = []
        self._pieces: list[str] = []
        self._mask_name = "[gMASK]"
        self._show_probs = False

        self.prompt = w.Textarea(value=prompt, placeholder="Prompt. Use [MASK], [sMASK] or [gMASK]; "
                                 "without a mask GLM continues the text.", continuous_update=True,
                                 layout=w.Layout(width="100%", height="8em"))
        self.token_count = w.HTML()
        self.controls: dict[str, w.Widget] = {
            "strategy": labelled(w.Dropdown(options=STRATEGIES, value="greedy"), "strategy"),
            "max_new_tokens": labelled(w.IntText(32), "max new tokens", "per blank"),
            "min_new_tokens": labelled(w.IntText(0), "min new tokens", "end tokens banned until then"),
            "temperature": labelled(w.FloatText(0.8, step=0.1), "temperature", "0 means greedy"),
            "top_k": labelled(w.IntText(0), "top-k", "0 means off"),
            "top_p": labelled(w.FloatText(1.0, step=0.05), "top-p", "in (0, 1]; 1 means off"),
            "seed": labelled(w.Text("", placeholder="random"), "seed",
                             "a whole number for reproducible sampling"),
            "num_beams": labelled(w.IntText(4), "beams"),
            "length_penalty": labelled(w.FloatText(1.0, step=0.1), "length penalty",
                                       "> 1 favours longer beams"),
            "no_repeat_ngram_size": labelled(w.IntText(0), "no-repeat n-gram", "0 means off"),
            "repetition_penalty": labelled(w.FloatText(1.0, step=0.05), "repetition penalty", "1 means none"),
            "frequency_penalty": labelled(w.FloatText(0.0, step=0.1), "frequency penalty"),
            "presence_penalty": labelled(w.FloatText(0.0, step=0.1), "presence penalty"),
            "stop": w.Textarea("", placeholder="one stop sequence per line, e.g. \\n",
                               layout=w.Layout(width="24em", height="5em")),
            "show_probabilities": w.Checkbox(False, description="show probabilities", indent=False,
                                             tooltip=f"colour tokens by probability; hover for the top "
                                                     f"{TOP_ALTERNATIVES} alternatives; a table per token"),
        }
        self.set(**settings)
        self.generate_button = w.Button(description="Generate", button_style="primary", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.clear_button = w.Button(description="Clear", icon="eraser")
        self.view_code = w.ToggleButton(False, description="View code", icon="code",
                                        tooltip="the glmkit Python call and command line for these settings")
        self.compare = w.Checkbox(False, description="compare", indent=False,
                                  tooltip="run the prompt twice (other settings or a second backend), "
                                          "side by side")
        self.output = w.HTML(layout=w.Layout(width="100%", min_height="3em", border="1px solid #ddd",
                                             padding="4px"))
        self._build_code_box()
        self._build_compare()
        self.presets_bar = PresetsBar(presets_path, self.settings, lambda values: self.set(**values),
                                      self._guarded, self.status, on_names=self._refresh_presets)
        self.token_table = w.HTML(layout=w.Layout(max_height="24em", overflow="auto"))
        self.token_ids = w.Textarea("", layout=w.Layout(width="100%", height="4em"),
                                    placeholder="generated token ids appear here after a run")
        self.history_panel = HistoryPanel(self._guarded(self.load_run))
        self.answer_views = [self.output, self.output_b, self.divergence_line, self.token_table,
                             self.token_ids]

        self.generate_button.on_click(self._guarded(lambda _: self.generate()))
        self.stop_button.on_click(self._guarded(lambda _: self.stop()))
        self.clear_button.on_click(self._guarded(lambda _: self.clear()))
        self.prompt.observe(self._guarded(lambda _: self._count_tokens()), "value")
        self.controls["strategy"].observe(self._guarded(lambda _: self._enable_for_strategy()), "value")
        self.view_code.observe(self._guarded(lambda _: self._refresh_code()), "value")
        self.compare.observe(self._guarded(lambda _: self._show_compare()), "value")
        for widget in [self.prompt, *self.controls.values()]:
            widget.observe(self._guarded(lambda _: self._refresh_code()), "value")
        self._count_tokens()
        self._enable_for_strategy()
        self._show_compare()

        c = self.controls
        settings_widgets = [c[name] for name in c if name not in ("stop", "show_probabilities")]
        for widget in settings_widgets:
            # Fill the grid cell instead of the stock 300px, which ran over the next column's label.
            widget.layout.width = "100%"
        grid = w.GridBox(settings_widgets,
                         layout=w.Layout(grid_template_columns="repeat(auto-fill, minmax(19em, 1fr))",
                                         grid_gap="2px 12px"))
        stop_box = w.HBox([w.VBox([w.Label("stop sequences"), c["stop"]]),
                           w.HTML(f'<div style="max-width:32em;font-size:90%;color:#555">{STOP_HINT}</div>')])
        for box in (c["show_probabilities"], self.compare):
            box.layout.width = "auto"  # the stock 300px leaves wide gaps and can cut a description
        buttons = w.HBox([self.generate_button, self.stop_button, self.clear_button, self.view_code,
                          c["show_probabilities"], self.compare], layout=w.Layout(grid_gap="8px"))
        outputs = w.HBox([self.output, self.output_b], layout=w.Layout(width="100%"))
        tokens = w.VBox([w.HTML("<b>token ids</b> (select and copy)"), self.token_ids, self.token_table])
        self._finish([self.prompt, self.token_count, grid, stop_box, self.presets_bar.root, self.compare_row,
                      buttons, self.code_box, outputs, self.divergence_line, tokens,
                      self.history_panel.root])

    def _build_code_box(self) -> None:
        self.python_view = w.Textarea("", layout=w.Layout(width="100%", height="11em"))
        self.cli_view = w.Textarea("", layout=w.Layout(width="100%", height="4em"))
        for view in (self.python_view, self.cli_view):
            view.add_class("glmkit-code")
        # Textarea has no font setting; a style element in the page gives code its monospace font.
        style = w.HTML("<style>.glmkit-code textarea {font-family: ui-monospace, Menlo, Consolas, "
                       "monospace; font-size: 90%}</style>")
        self.code_box = w.VBox([style, w.HTML("<b>Python</b> (select and copy)"), self.python_view,
                                w.HTML("<b>command line</b>"), self.cli_view],
                               layout=w.Layout(width="100%", display="none"))

    def _build_compare(self) -> None:
        options = [(f"A's backend ({describe_backend(self.backend)})", "a")]
        if self.second_backend is not None:
            options.append((f"second backend ({describe_backend(self.second_backend)})", "b"))
        self.compare_backend = labelled(w.Dropdown(options=options, value=options[-1][1]), "B runs on",
                                        width="6em")
        self.compare_backend.layout.width = "30em"
        self.compare_settings = labelled(w.Dropdown(options=[SAME_SETTINGS]), "B settings",
                                         "the settings of A, or a saved preset", width="6em")
        self.compare_settings.layout.width = "22em"
        self.compare_row = w.HBox([self.compare_backend, self.compare_settings],
                                  layout=w.Layout(grid_gap="6px"))
        self.output_b = w.HTML(layout=w.Layout(width="50%", min_height="3em", border="1px solid #ddd",
                                               padding="4px"))
        self.divergence_line = w.HTML()

    # ----- settings -------------------------------------------------------------------------------

    def set(self, **values) -> None:
        """Set controls by name, e.g. `set(strategy="sampling", top_p=0.9, stop="\\\\n")`."""
        unknown = sorted(set(values) - set(self.controls))
        if unknown:
            raise TypeError(f"unknown playground settings {unknown}; known: {sorted(self.controls)}")
        for name, value in values.items():
            if name == "stop" and not isinstance(value, str):
                value = "\n".join(escape_text(s) for s in value)
            if name == "seed":
                value = "" if value is None else str(value)
            self.controls[name].value = value

    def settings(self) -> dict:
        """The controls' values as `set()` takes them (stop: a list of strings; seed: an int or None)."""
        values = {name: widget.value for name, widget in self.controls.items()}
        values["stop"] = parse_stop_lines(values["stop"])
        seed = values["seed"].strip()
        if seed and not re.fullmatch(r"\d+", seed):
            raise ValueError(f"seed must be a whole number >= 0 (or empty for random), got {seed!r}")
        values["seed"] = int(seed) if seed else None
        return values

    def generation_kwargs(self) -> dict:
        """The keyword arguments the current controls give `generate()`; ValueError when invalid."""
        return kwargs_for(self.settings())

    def _enable_for_strategy(self) -> None:
        wanted = _STRATEGY_FIELDS[self.controls["strategy"].value]
        for names in _STRATEGY_FIELDS.values():
            for name in names:
                self.controls[name].disabled = name not in wanted

    def _count_tokens(self) -> None:
        self.token_count.value = prompt_token_summary(self.tokenizer, self.prompt.value)

    # ----- view code and presets ------------------------------------------------------------------

    def code(self) -> tuple[str, str]:
        """(Python, command line) that run the current prompt with the current settings."""
        kwargs = self.generation_kwargs()
        return (python_code(self.prompt.value, kwargs, self.backend),
                cli_line(self.prompt.value, kwargs, self.backend))

    def _refresh_code(self) -> None:
        self.code_box.layout.display = None if self.view_code.value else "none"
        if not self.view_code.value:
            return
        try:
            self.python_view.value, self.cli_view.value = self.code()
        except (ValueError, TypeError) as error:  # half-typed settings: say so here, keep the answer
            self.python_view.value = f"# not valid yet: {error}"
            self.cli_view.value = ""

    def save_preset(self, name: str) -> None:
        """Save the current settings under `name` in the presets file."""
        self.presets_bar.save(name)

    def load_preset(self, name: str) -> None:
        """Set the controls from the preset `name` of the presets file."""
        self.presets_bar.load(name)

    def _refresh_presets(self, names: list[str]) -> None:
        chosen = self.compare_settings.value
        self.compare_settings.options = [SAME_SETTINGS] + names
        self.compare_settings.value = chosen if chosen in self.compare_settings.options else SAME_SETTINGS

    def _show_compare(self) -> None:
        comparing = self.compare.value
        self.compare_row.layout.display = None if comparing else "none"
        self.output_b.layout.display = None if comparing else "none"
        self.output.layout.width = "50%" if comparing else "100%"
        if comparing:
            self.presets_bar.refresh()

    def _compare_plan(self, settings: dict):
        """(backend, kwargs, label) of compare mode's second run."""
        backend = self.second_backend if self.compare_backend.value == "b" else self.backend
        chosen = self.compare_settings.value
        values = settings if chosen == SAME_SETTINGS else {**settings, **self.presets_bar.store().get(chosen)}
        label = f"B: {describe_backend(backend)}, {'A’s settings' if chosen == SAME_SETTINGS else chosen}"
        return backend, kwargs_for(values), label

    # ----- running --------------------------------------------------------------------------------

    def generate(self) -> None:
        """Start generating from the current prompt in the background (what the Generate button does)."""
        prompt = self.prompt.value
        checked = self._begin(lambda: self._checked_request(prompt), busy="already generating: press Stop first")
        if checked is None:
            return
        settings, kwargs, other = checked
        self._clear_answer()
        self._layout(prompt)
        self._blanks = [[]]  # the first blank shows as live (with a cursor) until text arrives
        self._show_probs = bool(kwargs.get("top_logprobs"))
        self.output.value = self._render(streaming=True)
        self.status.value = info_html("generating…")
        self._set_running(True)
        lock = backend_lock(self.backend)
        if other is not None and other[0] is not self.backend:
            lock = LockPair(lock, backend_lock(other[0]))
        self._start(lambda abort: self._run(prompt, settings, kwargs, other, abort), lock,
                    on_done=lambda: self._set_running(False))

    def _checked_request(self, prompt: str) -> tuple[dict, dict, tuple | None]:
        """(settings, generate() kwargs, compare mode's second run or None); bad input fails here, early."""
        settings = self.settings()
        kwargs = kwargs_for(settings)
        plan_prompt(self.tokenizer, prompt, max_sequence_length=1 << 30)  # mask errors, before any run
        other = self._compare_plan(settings) if self.compare.value else None
        return settings, kwargs, other

    def _layout(self, prompt: str) -> None:
        self._pieces = MASK_PATTERN.split(prompt)
        if len(self._pieces) == 1:
            self._pieces.append("")  # the [gMASK] GLM appends: generation goes at the end
        masks = MASK_PATTERN.findall(prompt)
        self._mask_name = masks[0] if masks else "[gMASK]"

    def _run(self, prompt: str, settings: dict, kwargs: dict, other, abort) -> None:
        started = time.perf_counter()
        count, last_render = [0], [0.0]

        def on_text(event: TextEvent) -> None:
            count[0] += 1
            self._add_event(event)
            now = time.perf_counter()
            if now - last_render[0] >= self.render_interval:
                last_render[0] = now
                self.output.value = self._render(streaming=True)
                rate = count[0] / max(now - started, 1e-9)
                self.status.value = info_html(f"generating… {count[0]} pieces, {rate:.1f}/s")

        result = _single(self.backend.generate(prompt, on_text=on_text, should_abort=abort.is_set, **kwargs))
        seconds = time.perf_counter() - started
        self._blanks = [_final_segments(self._blanks[k] if k < len(self._blanks) else [], blank)
                        for k, blank in enumerate(result.blanks)]
        compared, label = None, ""
        if other is not None and not abort.is_set():
            backend, kwargs_b, label = other
            self.output.value = self._render(streaming=False)
            self.status.value = info_html(f"A done; generating {label}…")
            compared = _single(backend.generate(prompt, should_abort=abort.is_set, **kwargs_b))
        run = Run(prompt, settings, kwargs, result, seconds, list(self._blanks), compared, label)
        self.history_panel.add(run)
        self._show_run(run)
        tokens = result.num_generated_tokens
        self.status.value = info_html(f"{tokens} tokens in {seconds:.2f} s ({tokens / max(seconds, 1e-9):.1f}"
                                      f"/s), finish reason: {result.finish_reason}"
                                      + (f"; B: {compared.finish_reason}" if compared is not None else ""))

    def _show_run(self, run: Run) -> None:
        """Render a finished run: the output (both sides in compare mode), the token table and ids."""
        self.result, self.compared = run.result, run.compared
        self._layout(run.prompt)
        self._blanks = list(run.segments)
        self._show_probs = bool(run.kwargs.get("top_logprobs"))
        if run.compared is None:
            self.output.value = self._render(streaming=False)
            self.output_b.value = self.divergence_line.value = ""
        else:
            a, b = generated_ids(run.result), generated_ids(run.compared)
            at = first_id_divergence(a, b)
            self.output.value = (f"<b>A: {esc(describe_backend(self.backend))}</b>"
                                 + compare_html(self.tokenizer, self._pieces, run.result, at, self._mask_name))
            self.output_b.value = (f"<b>{esc(run.compare_label)}</b>"
                                   + compare_html(self.tokenizer, self._pieces, run.compared, at,
                                                  self._mask_name))
            self.divergence_line.value = f"<b>{esc(describe_id_divergence(self.tokenizer, a, b, at))}</b>"
        self.token_table.value = logprob_table_html(self.logprob_rows(run.result))
        ids = [blank.tokens for blank in run.result.blanks]
        text = json.dumps(ids[0] if len(ids) == 1 else ids)
        if run.compared is not None:
            ids_b = [blank.tokens for blank in run.compared.blanks]
            text = f"A: {text}\nB: {json.dumps(ids_b[0] if len(ids_b) == 1 else ids_b)}"
        self.token_ids.value = text

    def logprob_rows(self, result: GenerationResult | None = None) -> list[dict]:
        """One dict per generated token with logprobs: position, blank, id, piece, logprob, top alternatives."""
        result = self.result if result is None else result
        rows = []
        for k, blank in enumerate(result.blanks if result is not None else []):
            for record in blank.logprobs or []:
                rows.append({"position": len(rows), "blank": k, "id": record.token,
                             "piece": self._piece(record.token), "logprob": record.logprob,
                             "top": [(self._piece(token), lp) for token, lp in record.top]})
        return rows

    def token_table_frame(self) -> pd.DataFrame:
        """The per-token table of the last run as a DataFrame (empty without show probabilities)."""
        columns = ["blank", "id", "piece", "logprob", "top"]
        return pd.DataFrame(self.logprob_rows(), columns=["position"] + columns).set_index("position")

    def _add_event(self, event: TextEvent) -> None:
        if event.index != 0:
            return
        while len(self._blanks) <= event.blank:
            self._blanks.append([])
        record = event.logprob
        top = ()
        if record is not None and record.top:
            top = tuple((self._piece(token), lp) for token, lp in record.top)
        self._blanks[event.blank].append(Segment(event.text, record.logprob if record else None, top))

    def _piece(self, token: int) -> str:
        try:
            return self.tokenizer.id_to_piece(token)
        except (ValueError, TypeError, IndexError):
            return f"<id {token}>"

    def _render(self, streaming: bool) -> str:
        return generation_html(self._pieces, self._blanks, self._mask_name,
                               probabilities=self._show_probs, streaming=streaming)

    def _set_running(self, running: bool) -> None:
        self.generate_button.disabled = running
        self.clear_button.disabled = running
        self.stop_button.disabled = not running

    def _clear_answer(self) -> None:
        super()._clear_answer()
        self.result = self.compared = None
        self._blanks = []

    def clear(self) -> None:
        """Empty the output, the status line and the error panel (the history is kept)."""
        if self.running:
            self.status.value = info_html("still generating: press Stop first")
            return
        self._clear_answer()
        self.status.value = ""
        self.clear_errors()

    # ----- history --------------------------------------------------------------------------------

    @property
    def history(self) -> pd.DataFrame:
        """Past runs: prompt, parameters, output, completion, finish reason, token counts, seconds."""
        return pd.DataFrame([run.row() for run in self.history_panel.runs], columns=HISTORY_COLUMNS)

    def load_run(self, run: Run | int) -> None:
        """Put a past run back (a Run, or its row number in `history`): prompt, settings and output."""
        if self.running:
            raise ValueError("still generating: press Stop before loading a run")
        if isinstance(run, int):
            runs = self.history_panel.runs
            if not -len(runs) <= run < len(runs):
                raise ValueError(f"no run {run} in the history ({len(runs)} runs)")
            run = runs[run]
        self.clear_errors()
        self.prompt.value = run.prompt
        self.set(**run.settings)
        self.compare.value = run.compared is not None
        self._show_run(run)
        number = self.history_panel.runs.index(run) + 1 if run in self.history_panel.runs else "?"
        self.status.value = info_html(f"loaded run #{number}: finish reason {run.result.finish_reason}")

    def clear_history(self) -> None:
        """Forget past runs."""
        self.history_panel.clear()


def _single(result):
    return result[0] if isinstance(result, list) else result


def _final_segments(streamed: list[Segment], blank) -> list[Segment]:
    """A finished blank's text as segments: the streamed ones, plus any text held back at the end."""
    joined = "".join(s.text for s in streamed)
    if blank.text.startswith(joined):
        rest = blank.text[len(joined):]
        return streamed + ([Segment(rest)] if rest else [])
    return [Segment(blank.text)]


__all__ = ["Playground", "parse_stop_lines", "prompt_token_summary", "kwargs_for"]
