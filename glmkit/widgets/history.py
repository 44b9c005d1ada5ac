"""The playground's history: every finished run (prompt, settings, result), listed so any can be re-loaded."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import ipywidgets as w

from ..generate.blanks import GenerationResult

HISTORY_COLUMNS = ["prompt", "parameters", "output", "completion", "finish_reason", "prompt_tokens",
                   "tokens", "seconds"]


@dataclass
class Run:
    """One finished run: the prompt, the playground's settings and generate() kwargs, and what came back.

    `segments` are the streamed segments of each blank (for re-rendering the probability colours);
    `compared` is the other side's result in compare mode.
    """

    prompt: str
    settings: dict
    kwargs: dict
    result: GenerationResult
    seconds: float
    segments: list = field(default_factory=list)
    compared: GenerationResult | None = None
    compare_label: str = ""
    finished_at: float = field(default_factory=time.time)

    def row(self) -> dict:
        """This run as a row of `Playground.history`."""
        r = self.result
        return {"prompt": self.prompt, "parameters": dict(self.kwargs), "output": r.text,
                "completion": r.completion, "finish_reason": r.finish_reason,
                "prompt_tokens": r.num_prompt_tokens, "tokens": r.num_generated_tokens,
                "seconds": round(self.seconds, 3)}

    def label(self, number: int) -> str:
        """One line for the history list: number, time, strategy, prompt start and answer start."""
        def short(text: str, n: int) -> str:
            text = text.replace("\n", "↵")
            return text if len(text) <= n else text[:n - 1] + "…"
        clock = time.strftime("%H:%M:%S", time.localtime(self.finished_at))
        strategy = self.settings.get("strategy", "")
        extra = " · compare" if self.compared is not None else ""
        return (f"#{number} {clock} {strategy}{extra} · {short(self.prompt, 28)!r} → "
                f"{short(self.result.completion, 24)!r}")


class HistoryPanel:
    """A list of past runs and a Load button; `on_load(run)` gets the chosen one."""

    def __init__(self, on_load):
        self.runs: list[Run] = []
        # The whole row's width: an entry (time, strategy, prompt -> answer) is ~95 characters long.
        self.picker = w.Dropdown(options=[], description="history", style={"description_width": "5em"},
                                 layout=w.Layout(flex="1 1 auto", width="auto"))
        self.load_button = w.Button(description="Load run", icon="history",
                                    tooltip="put the chosen run's prompt, settings and output back")
        self.load_button.on_click(lambda _: on_load(self.chosen()))
        self.root = w.HBox([self.picker, self.load_button], layout=w.Layout(width="100%"))
        self._refresh()

    def add(self, run: Run) -> None:
        """Record a finished run and select it."""
        self.runs.append(run)
        self._refresh()

    def clear(self) -> None:
        """Forget every run."""
        self.runs.clear()
        self._refresh()

    def chosen(self) -> Run:
        """The selected run; ValueError when there is none yet."""
        if self.picker.value is None:
            raise ValueError("no run in the history yet: press Generate first")
        return self.runs[self.picker.value]

    def _refresh(self) -> None:
        options = [(run.label(i + 1), i) for i, run in enumerate(self.runs)]
        self.picker.options = options
        self.picker.value = options[-1][1] if options else None
        self.load_button.disabled = not options


__all__ = ["Run", "HistoryPanel", "HISTORY_COLUMNS"]
