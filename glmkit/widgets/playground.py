"""The prompt playground: edit a prompt and the generation settings, stream the output, keep a history."""
from __future__ import annotations

import re
import time

import ipywidgets as w
import pandas as pd

from ..generate.blanks import MASK_PATTERN, GenerationResult, TextEvent, plan_prompt
from ..generate.sampling import GenerationSettings
from ._base import Tool, backend_lock, error_html, info_html, labelled
from .render import Segment, escape_text, generation_html, unescape

STRATEGIES = ("greedy", "sampling", "beam")
HISTORY_COLUMNS = ["prompt", "parameters", "output", "completion", "finish_reason", "prompt_tokens",
                   "tokens", "seconds"]
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
    return info_html(f"{own} prompt tokens; {len(plan.tokens) + 1} with the {' + '.join(added)} GLM adds")


class Playground(Tool):
    """Prompt playground over any backend with `.tokenizer` and `.generate(prompt, on_text=, should_abort=)`.

    `controls` maps each generation setting name to its widget; `generate()` (the Generate button) runs
    in the background; `history` is a DataFrame of past runs.
    """

    # Seconds between streamed re-renders: a small CPU model emits hundreds of tokens a second, and
    # each render resends the whole output to the browser. The final render always happens.
    render_interval = 0.05

    def __init__(self, backend, prompt: str = "", **settings):
        super().__init__()
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.result: GenerationResult | None = None
        self._history: list[dict] = []
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
                                                     f"{TOP_ALTERNATIVES} alternatives"),
        }
        self.set(**settings)
        self.generate_button = w.Button(description="Generate", button_style="primary", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.clear_button = w.Button(description="Clear", icon="eraser")
        self.output = w.HTML(layout=w.Layout(width="100%", min_height="3em", border="1px solid #ddd",
                                             padding="4px"))

        self.generate_button.on_click(self._guarded(lambda _: self.generate()))
        self.stop_button.on_click(self._guarded(lambda _: self.stop()))
        self.clear_button.on_click(self._guarded(lambda _: self.clear()))
        self.prompt.observe(self._guarded(lambda _: self._count_tokens()), "value")
        self.controls["strategy"].observe(self._guarded(lambda _: self._enable_for_strategy()), "value")
        self._count_tokens()
        self._enable_for_strategy()

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
        buttons = w.HBox([self.generate_button, self.stop_button, self.clear_button, c["show_probabilities"]])
        self._finish([self.prompt, self.token_count, grid, stop_box, buttons, self.output])

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

    def generation_kwargs(self) -> dict:
        """The keyword arguments the current controls give `generate()`; ValueError when invalid."""
        c = {name: widget.value for name, widget in self.controls.items()}
        kwargs = {name: c[name] for name in ("max_new_tokens", "min_new_tokens", "no_repeat_ngram_size",
                                             "repetition_penalty", "frequency_penalty", "presence_penalty")}
        stops = parse_stop_lines(c["stop"])
        if stops:
            kwargs["stop"] = stops
        strategy = c["strategy"]
        if strategy == "sampling":
            kwargs.update(do_sample=True, temperature=c["temperature"], top_k=c["top_k"], top_p=c["top_p"])
            seed = c["seed"].strip()
            if seed:
                if not re.fullmatch(r"\d+", seed):
                    raise ValueError(f"seed must be a whole number >= 0 (or empty for random), got {seed!r}")
                kwargs["seed"] = int(seed)
        elif strategy == "beam":
            kwargs.update(num_beams=c["num_beams"], length_penalty=c["length_penalty"])
        if c["show_probabilities"]:
            kwargs.update(logprobs=True, top_logprobs=TOP_ALTERNATIVES)
        GenerationSettings.from_kwargs(**kwargs)  # same validation the backend applies, before any work
        return kwargs

    def _enable_for_strategy(self) -> None:
        wanted = _STRATEGY_FIELDS[self.controls["strategy"].value]
        for names in _STRATEGY_FIELDS.values():
            for name in names:
                self.controls[name].disabled = name not in wanted

    def _count_tokens(self) -> None:
        self.token_count.value = prompt_token_summary(self.tokenizer, self.prompt.value)

    # ----- running --------------------------------------------------------------------------------

    def generate(self) -> None:
        """Start generating from the current prompt in the background (what the Generate button does)."""
        if self.running:
            self.status.value = info_html("already generating: press Stop first")
            return
        self.clear_errors()
        prompt = self.prompt.value
        try:
            kwargs = self.generation_kwargs()
            plan_prompt(self.tokenizer, prompt, max_sequence_length=1 << 30)  # mask errors, early
        except (ValueError, TypeError) as error:
            self.report_error(error)
            return
        self._pieces = MASK_PATTERN.split(prompt)
        if len(self._pieces) == 1:
            self._pieces.append("")  # the [gMASK] GLM appends: generation goes at the end
        masks = MASK_PATTERN.findall(prompt)
        self._mask_name = masks[0] if masks else "[gMASK]"
        self._blanks = [[]]  # the first blank shows as live (with a cursor) until text arrives
        self._show_probs = bool(kwargs.get("top_logprobs"))
        self.output.value = self._render(streaming=True)
        self.status.value = info_html("generating…")
        self._set_running(True)
        self._start(lambda abort: self._run(prompt, kwargs, abort), backend_lock(self.backend),
                    on_done=lambda: self._set_running(False))

    def _run(self, prompt: str, kwargs: dict, abort) -> None:
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

        result = self.backend.generate(prompt, on_text=on_text, should_abort=abort.is_set, **kwargs)
        if isinstance(result, list):
            result = result[0]
        seconds = time.perf_counter() - started
        self.result = result
        self._blanks = [_final_segments(self._blanks[k] if k < len(self._blanks) else [], blank)
                        for k, blank in enumerate(result.blanks)]
        self.output.value = self._render(streaming=False)
        self._history.append({
            "prompt": prompt, "parameters": dict(kwargs), "output": result.text,
            "completion": result.completion, "finish_reason": result.finish_reason,
            "prompt_tokens": result.num_prompt_tokens, "tokens": result.num_generated_tokens,
            "seconds": round(seconds, 3)})
        tokens = result.num_generated_tokens
        self.status.value = info_html(f"{tokens} tokens in {seconds:.2f} s ({tokens / max(seconds, 1e-9):.1f}"
                                      f"/s), finish reason: {result.finish_reason}")

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

    def clear(self) -> None:
        """Empty the output, the status line and the error panel (the history is kept)."""
        if self.running:
            self.status.value = info_html("still generating: press Stop first")
            return
        self.output.value = ""
        self.status.value = ""
        self.clear_errors()

    # ----- history --------------------------------------------------------------------------------

    @property
    def history(self) -> pd.DataFrame:
        """Past runs: prompt, parameters, output, completion, finish reason, token counts, seconds."""
        return pd.DataFrame(self._history, columns=HISTORY_COLUMNS)

    def clear_history(self) -> None:
        """Forget past runs."""
        self._history.clear()


def _final_segments(streamed: list[Segment], blank) -> list[Segment]:
    """A finished blank's text as segments: the streamed ones, plus any text held back at the end."""
    joined = "".join(s.text for s in streamed)
    if blank.text.startswith(joined):
        rest = blank.text[len(joined):]
        return streamed + ([Segment(rest)] if rest else [])
    return [Segment(blank.text)]


__all__ = ["Playground", "parse_stop_lines", "prompt_token_summary"]
