"""Widget tools driven programmatically, against a scripted fake backend and against the demo model."""
from __future__ import annotations

import html as html_lib
import re
import threading
import time

import ipywidgets
import pytest

from glmkit.generate.tokens import TokenLogprob
from glmkit.generate.blanks import MASK_PATTERN, Blank, GenerationResult, TextEvent
from glmkit.generate.sampling import GenerationSettings
from glmkit.widgets import FewShot, FewShotTemplate, Playground, TokenInspector, load_template
from glmkit.widgets.render import esc

FIRST_ID = 20100  # token ids the fake hands out; real ids of the demo tokenizer, so pieces resolve


class FakeBackend:
    """The backend interface with scripted output: each blank streams `script` one piece per token.

    Honours `stop` (cut before the earliest stop string), `max_new_tokens`, `should_abort` (polled after
    every token, like the real loop) and `top_logprobs`; validates settings like GLMPipeline does.
    """

    def __init__(self, tokenizer, script=("Hello", ",", " world"), delay: float = 0.0, fail_after=None):
        self.tokenizer = tokenizer
        self.script = script
        self.delay = delay
        self.fail_after = fail_after
        self.calls: list[tuple[str, GenerationSettings]] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def generate(self, prompts, *, on_text=None, should_abort=None, **kwargs):
        settings = GenerationSettings.from_kwargs(**kwargs)
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            single = isinstance(prompts, str)
            batch = [prompts] if single else list(prompts)
            results = [self._one(i, p, settings, on_text, should_abort) for i, p in enumerate(batch)]
        finally:
            with self._lock:
                self.active -= 1
        return results[0] if single else results

    def _one(self, index, prompt, settings, on_text, should_abort):
        self.calls.append((prompt, settings))
        pieces = MASK_PATTERN.split(prompt)
        result = GenerationResult(prompt, pieces[0], num_prompt_tokens=7)
        for blank_no in range(max(1, len(pieces) - 1)):
            script = self.script(prompt, blank_no) if callable(self.script) else self.script
            text, tokens, records, reason = "", [], [], "length"
            for k, piece in enumerate(script[:settings.max_new_tokens]):
                if self.fail_after is not None and len(tokens) >= self.fail_after:
                    raise RuntimeError("the fake backend broke")
                time.sleep(self.delay)
                token = FIRST_ID + k
                record = None
                if settings.wants_logprobs:
                    top = tuple((FIRST_ID + j, -0.1 * (j + 1)) for j in range(settings.top_logprobs))
                    record = TokenLogprob(token, -0.5, top)
                    records.append(record)
                tokens.append(token)
                candidate = text + piece
                cuts = [candidate.find(s) for s in settings.stop if s in candidate]
                visible = candidate[:min(cuts)] if cuts else candidate
                if on_text is not None and visible[len(text):]:
                    on_text(TextEvent(index, blank_no, token, visible[len(text):], record))
                text = visible
                if cuts:
                    reason = "stop"
                    break
                if should_abort is not None and should_abort():
                    reason = "abort"
                    break
            start = len(result.text)
            result.text += text
            result.blanks.append(Blank(text, start, len(result.text), tokens, reason,
                                       records if settings.wants_logprobs else None))
            if blank_no + 1 < len(pieces):
                result.text += pieces[blank_no + 1]
            if reason == "abort":
                break
        return result


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def stderr_text(tool) -> str:
    return "".join(o.get("text", "") for o in tool.errors.outputs)


@pytest.fixture
def fake(tokenizer):
    return FakeBackend(tokenizer)


# ----- Playground ---------------------------------------------------------------------------------

def test_playground_streams_into_the_output_and_records_history(tokenizer):
    backend = FakeBackend(tokenizer, script=["Hello", ",", " world", "!"], delay=0.01)
    pg = Playground(backend, prompt="Say: ", max_new_tokens=10)
    pg.render_interval = 0  # every event re-renders
    states = []
    pg.output.observe(lambda change: states.append(change["new"]), "value")
    pg.generate_button.click()
    assert pg.running and pg.generate_button.disabled and not pg.stop_button.disabled
    assert pg.wait(5)
    streamed = [s for s in states if "▌" in s]  # the live cursor marks a streaming render
    assert len(streamed) >= 4
    assert "Hello," in streamed[2] and "world" not in streamed[2]
    final = pg.output.value
    assert "▌" not in final and "Say: " in final
    assert 'class="glmkit-blank"' in final and "Hello, world!" in final
    assert not pg.generate_button.disabled and pg.stop_button.disabled
    history = pg.history
    assert list(history.columns) == ["prompt", "parameters", "output", "completion", "finish_reason",
                                     "prompt_tokens", "tokens", "seconds"]
    row = history.iloc[0]
    assert row.prompt == "Say: " and row.output == "Say: Hello, world!" and row.tokens == 4
    assert row.parameters["max_new_tokens"] == 10 and row.finish_reason == "length" and row.seconds > 0
    assert "4 tokens" in pg.status.value


def test_streamed_renders_are_throttled_but_the_final_one_is_complete(tokenizer):
    backend = FakeBackend(tokenizer, script=["a", "b", "c", "d"], delay=0.005)
    pg = Playground(backend, prompt="x")
    pg.render_interval = 60
    states = []
    pg.output.observe(lambda change: states.append(change["new"]), "value")
    pg.generate_button.click()
    assert pg.wait(5)
    assert len(states) <= 3 and "abcd" in states[-1] and "▌" not in states[-1]


def test_playground_does_not_block_and_stop_aborts(tokenizer):
    backend = FakeBackend(tokenizer, script=["x"] * 500, delay=0.01)
    pg = Playground(backend, prompt="go", max_new_tokens=500)
    started = time.perf_counter()
    pg.generate_button.click()
    assert time.perf_counter() - started < 0.5  # the click returns while the backend still runs
    assert wait_until(lambda: pg.output.value.count("x") >= 3)
    pg.stop_button.click()
    assert pg.wait(2)
    assert pg.result.finish_reason == "abort" and pg.result.num_generated_tokens < 100
    assert pg.history.iloc[-1].finish_reason == "abort"
    assert "abort" in pg.status.value


def test_invalid_parameters_show_a_message_and_start_nothing(fake):
    pg = Playground(fake, prompt="hi")
    pg.set(strategy="sampling", top_p=0)
    pg.generate_button.click()
    assert not pg.running and fake.calls == []
    assert "top_p must be in (0, 1]" in pg.status.value
    assert isinstance(pg.last_error, ValueError) and stderr_text(pg) == ""  # one message, no traceback
    pg.set(top_p=0.9, seed="abc")
    pg.generate_button.click()
    assert "seed must be a whole number" in pg.status.value
    pg.set(seed="", min_new_tokens=9, max_new_tokens=3)
    pg.generate_button.click()
    assert "min_new_tokens (9) must not exceed max_new_tokens (3)" in pg.status.value
    pg.set(min_new_tokens=0)
    pg.prompt.value = "a [mask] b"
    assert "malformed mask" in pg.token_count.value
    pg.generate_button.click()
    assert "malformed mask" in pg.status.value and fake.calls == [] and pg.history.empty
    with pytest.raises(TypeError, match="unknown playground settings"):
        pg.set(nucleus=0.5)


@pytest.mark.parametrize("make, start", [(lambda b: Playground(b, prompt="go", max_new_tokens=500), "generate"),
                                         (lambda b: FewShot(b, queries=["a"], max_new_tokens=500), "run")])
def test_a_second_start_while_running_says_press_stop_and_starts_nothing(tokenizer, make, start):
    backend = FakeBackend(tokenizer, script=["x"] * 500, delay=0.01)
    tool = make(backend)
    getattr(tool, start)()  # the method, not the button: a notebook can call it while the button is disabled
    assert wait_until(lambda: backend.calls)
    running = tool._thread
    getattr(tool, start)()
    assert "press Stop first" in tool.status.value and tool._thread is running
    tool.stop()
    assert tool.wait(3) and len(backend.calls) == 1


def test_backend_errors_show_in_the_widget_and_the_tool_recovers(tokenizer):
    backend = FakeBackend(tokenizer, script=["a", "b", "c"], fail_after=2)
    pg = Playground(backend, prompt="p")
    pg.generate_button.click()
    assert pg.wait(5)
    assert "RuntimeError: the fake backend broke" in pg.status.value
    # A bug's traceback is kept for a report, folded away under the message.
    assert "Traceback" in stderr_text(pg) and "the fake backend broke" in stderr_text(pg)
    assert pg.error_details.selected_index is None and pg.error_details.layout.display is None
    assert isinstance(pg.last_error, RuntimeError)
    assert not pg.generate_button.disabled and pg.stop_button.disabled and pg.history.empty
    backend.fail_after = None
    pg.generate_button.click()
    assert pg.wait(5) and len(pg.history) == 1 and pg.errors.outputs == ()


def test_user_and_model_text_is_escaped(tokenizer):
    backend = FakeBackend(tokenizer, script=["<b>bold</b>", "<img src=x onerror=alert(1)>"])
    pg = Playground(backend, prompt="<script>alert(1)</script> [MASK] & done")
    pg.generate_button.click()
    assert pg.wait(5)
    html = pg.output.value
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<b>" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html and "<img" not in html
    assert "&amp; done" in html


def test_each_blank_is_highlighted_in_place(tokenizer):
    backend = FakeBackend(tokenizer, script=lambda prompt, blank: ["first", "second"][blank:blank + 1])
    pg = Playground(backend, prompt="A [MASK] B [MASK] C")
    pg.generate_button.click()
    assert pg.wait(5)
    assert pg.result.text == "A first B second C"
    html = pg.output.value
    assert html.count('class="glmkit-blank"') == 2
    assert re.sub("<[^>]+>", "", html) == "A first B second C"  # blanks in place, in order


def test_probabilities_colour_tokens_and_list_alternatives(fake, tokenizer):
    pg = Playground(fake, prompt="x", show_probabilities=True)
    assert pg.generation_kwargs()["top_logprobs"] == 5
    pg.generate_button.click()
    assert pg.wait(5)
    settings = fake.calls[-1][1]
    assert settings.top_logprobs == 5
    html = pg.output.value
    assert html.count("hsl(") == 3  # one coloured span per streamed token
    assert "p = 0.607" in html  # exp(-0.5)
    for j in range(5):
        assert esc(repr(tokenizer.id_to_piece(FIRST_ID + j))) in html
    pg.set(show_probabilities=False)
    assert "top_logprobs" not in pg.generation_kwargs()


def test_token_count_follows_the_prompt(fake, tokenizer):
    pg = Playground(fake)
    pg.prompt.value = "English: cheese\nGerman:"
    own = len(tokenizer.encode_with_masks(pg.prompt.value))
    assert f"{own} prompt tokens; {own + 2} with the [gMASK] + sop" in pg.token_count.value
    pg.prompt.value = "The capital of [MASK] is Paris."
    own = len(tokenizer.encode_with_masks(pg.prompt.value))
    assert f"{own} prompt tokens; {own + 2} with the eos + sop" in pg.token_count.value


def test_controls_map_to_generation_settings(fake):
    pg = Playground(fake, prompt="x")
    pg.set(strategy="greedy", temperature=0.3, stop="\\nEnglish:\n\\s\n\n")
    kwargs = pg.generation_kwargs()
    assert "temperature" not in kwargs and "do_sample" not in kwargs
    assert kwargs["stop"] == ["\nEnglish:", " "]  # "\n" written as two characters is a newline
    assert pg.controls["temperature"].disabled and not pg.controls["max_new_tokens"].disabled
    pg.set(strategy="sampling", temperature=0.3, top_k=5, top_p=0.9, seed=7)
    kwargs = pg.generation_kwargs()
    assert kwargs["do_sample"] and kwargs["seed"] == 7 and kwargs["top_k"] == 5
    assert not pg.controls["temperature"].disabled and pg.controls["num_beams"].disabled
    pg.set(strategy="beam", num_beams=3, length_penalty=1.5, stop=["\n", "a\\b"])
    kwargs = pg.generation_kwargs()
    assert kwargs["num_beams"] == 3 and "do_sample" not in kwargs and "seed" not in kwargs
    assert kwargs["stop"] == ["\n", "a\\b"]
    pg.generate_button.click()
    assert pg.wait(5)
    settings = fake.calls[-1][1]
    assert settings.num_beams == 3 and settings.stop == ("\n", "a\\b")


def test_clear_keeps_history_and_tools_share_a_backend_one_at_a_time(tokenizer):
    backend = FakeBackend(tokenizer, script=["y"] * 10, delay=0.005)
    first, second = Playground(backend, prompt="a"), Playground(backend, prompt="b")
    first.generate_button.click()
    second.generate_button.click()
    assert first.wait(5) and second.wait(5)
    assert backend.max_active == 1 and len(first.history) == len(second.history) == 1
    first.clear_button.click()
    assert first.output.value == "" and first.status.value == "" and len(first.history) == 1


def test_tools_display_and_close(fake):
    pg = Playground(fake)
    bundle = pg._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == pg.root.model_id
    pg.close()
    assert pg.root.comm is None and pg.prompt.comm is None


def test_playground_with_the_demo_model(pipeline):
    # min_new_tokens: the retrained model ends this blank after 3 tokens; the history must count all 4
    pg = Playground(pipeline, prompt="Tsinghua University is in [MASK] <b>", max_new_tokens=4, min_new_tokens=4,
                    show_probabilities=True)
    pg.generate_button.click()
    assert pg.wait(30)
    assert pg.last_error is None, stderr_text(pg)
    result = pg.result
    row = pg.history.iloc[0]
    assert row.output == result.text and row.tokens == result.num_generated_tokens == 4
    assert result.blanks[0].logprobs is not None and len(result.blanks[0].logprobs[0].top) == 5
    html = pg.output.value
    assert 'class="glmkit-blank"' in html and "&lt;b&gt;" in html and "<b>" not in html
    assert html.count("hsl(") >= 1
    pg.set(show_probabilities=False)
    pg.generate_button.click()
    assert pg.wait(30)
    assert esc(pg.result.blanks[0].text) in pg.output.value


def test_stop_aborts_the_demo_model(pipeline):
    pg = Playground(pipeline, prompt="Once upon a time", max_new_tokens=400)
    pg.generate_button.click()
    empty = pg.output.value  # the prompt with an empty live blank
    assert wait_until(lambda: pg.output.value != empty, timeout=20)
    pg.stop()
    assert pg.wait(20)
    assert pg.result.finish_reason == "abort" and pg.result.num_generated_tokens < 400


# ----- FewShot ------------------------------------------------------------------------------------

def runaway(prompt, blank):
    """A model that answers, then goes on to invent the next example."""
    return [" Haus", "\n", "English", ":", " dog", "\n", "German", ":", " Hund"]


def test_fewshot_stops_before_the_next_example(tokenizer):
    backend = FakeBackend(tokenizer, script=runaway)
    template = load_template("en-de-translation")
    stopped = template.run(backend, ["house"], max_new_tokens=20)
    assert stopped.iloc[0].answer == "Haus" and stopped.iloc[0].finish_reason == "stop"
    assert stopped.iloc[0].prompt == template.build_prompt("house")
    # Stops with visible text end the generation itself; the whitespace-only "\n" is watched by the template,
    # so that it only counts once the answer has begun.
    assert backend.calls[-1][1].stop == ("\nEnglish:",)
    runaway_run = template.run(backend, ["house"], use_stops=False, max_new_tokens=20)
    assert "English: dog" in runaway_run.iloc[0].completion


def test_fewshot_widget_runs_queries_into_a_dataframe(tokenizer):
    backend = FakeBackend(tokenizer, script=runaway)
    fs = FewShot(backend, "en-de-translation", queries=["house", "", "dog"], max_new_tokens=20)
    assert "stop sequences:" in fs.stops_view.value and esc(repr("\nEnglish:")) in fs.stops_view.value
    fs.run_button.click()
    assert fs.wait(5), stderr_text(fs)
    assert list(fs.results["query"]) == ["house", "dog"]
    assert list(fs.results["answer"]) == ["Haus", "Haus"]
    assert "<td>Haus</td>" in fs.results_view.value and "2 of 2" in fs.status.value
    assert [call[0] for call in backend.calls] == [fs.template.build_prompt(q) for q in ("house", "dog")]


def test_fewshot_widget_edits_previews_and_validates(fake, tmp_path):
    fs = FewShot(fake, None, queries="cheese ")
    fields = fs.fields
    fields["instruction"].value = "Translate."
    fields["input_prefix"].value = "English:"
    fields["output_prefix"].value = "German:"
    fields["example_separator"].value = "\\n\\n"  # typed escaped
    fields["trailing_space"].value = True
    fs.add_example_button.click()
    a, b, _ = fs._example_rows[0]
    a.value, b.value = "house", "Haus"
    template = fs.template
    assert template.example_separator == "\n\n"
    expected = "Translate.\n\nEnglish: house\nGerman: Haus\n\nEnglish: cheese \nGerman: "
    assert template.build_prompt("cheese ") == expected
    assert "↵" in fs.preview.value and 'title="trailing spaces"' in fs.preview.value
    assert "glmkit-token" in fs.preview_tokens.value
    path = tmp_path / "mine.yaml"
    fs.path.value = str(path)
    fs.save_button.click()
    assert FewShotTemplate.load(path) == template and "saved to" in fs.status.value
    again = FewShot(fake, None)
    again.load(str(path))
    assert again.template == template
    a.value = "a [MASK] here"
    assert "examples[0].input contains '[MASK]'" in html_lib.unescape(fs.preview.value)
    fs.run_button.click()
    assert not fs.running and "examples[0].input" in fs.status.value and fake.calls == []
    a.value = "house"
    fs.queries.value = "  \n"
    fs.run_button.click()
    assert "at least one query" in fs.status.value
    fs.picker.value = "en-python"
    assert fs.template == load_template("en-python") and len(fs._example_rows) == 3


def test_fewshot_stop_button_ends_a_run(tokenizer):
    backend = FakeBackend(tokenizer, script=["z"] * 200, delay=0.01)
    fs = FewShot(backend, "en-de-translation", queries=["a", "b", "c"], max_new_tokens=200)
    fs.run_button.click()
    assert wait_until(lambda: backend.calls)
    fs.stop_button.click()
    assert fs.wait(3)
    assert len(fs.results) <= 1 and "(stopped)" in fs.status.value and not fs.run_button.disabled


def test_fewshot_with_the_demo_model(pipeline):
    fs = FewShot(pipeline, "en-de-translation", queries=["house", "dog"], max_new_tokens=3)
    fs.run_button.click()
    assert fs.wait(30) and fs.last_error is None, stderr_text(fs)
    assert list(fs.results["query"]) == ["house", "dog"]
    assert all(n <= 3 for n in fs.results["tokens"])
    assert fs.results.iloc[0].prompt.endswith("English: house\nGerman:")


def test_fewshot_answers_start_after_the_models_leading_separators(pipeline):
    # A model that opens its answer after "Python:" with "\n\n" (the stdlib-only demo model did) would hit
    # the en-python stop at once: the stop must not fire on leading whitespace, or every answer is empty
    # (issue 16, defect 5). The retrained model opens with a space or two; the scripted test below opens
    # with "\n\n". Here: the real model's answers are what follows its leading whitespace, cut at the stop.
    template = load_template("en-python")
    assert "\n\n" in template.stop_sequences()
    table = template.run(pipeline, ["reverse a list", "the sum of a list of numbers"], max_new_tokens=32)
    assert all(table["answer"].str.strip().str.len() > 0), table[["answer", "completion", "finish_reason"]]
    for row in table.itertuples():
        body = row.completion.lstrip()
        assert row.completion[:1].isspace()  # the model did open with whitespace
        assert row.answer == body.strip() and "\n\n" not in body  # cut at the first blank line after it
        assert row.finish_reason in ("stop", "length")
    assert "stop" in set(table["finish_reason"])


def test_fewshot_leading_separator_with_a_scripted_backend(tokenizer):
    backend = FakeBackend(tokenizer, script=["\n", "\n", "x = 1", "\n", "\n", "English", ":"])
    row = load_template("en-python").run(backend, ["one"], max_new_tokens=20).iloc[0]
    assert row.answer == "x = 1" and row.completion == "\n\nx = 1" and row.finish_reason == "stop"
    assert row.tokens < 7  # the watched stop ended the generation, not the token limit


def test_fewshot_every_control_is_labelled_and_the_picker_names_the_template(fake):
    fs = FewShot(fake, "en-python")
    assert fs.picker.value == "en-python"  # a shipped template is named, not "(custom)"
    for name, widget in {**fs.fields, "picker": fs.picker}.items():
        label = widget.description
        assert label, f"{name} has no label"
        if isinstance(widget, ipywidgets.Checkbox):
            assert widget.layout.width == "auto", name  # a long checkbox text is never cut
        else:  # about 0.62em per character of JupyterLab's label font; the browser test checks the pixels
            width = float(widget.style.description_width.removesuffix("em"))
            assert width >= 0.62 * len(label), f"{name}: label {label!r} does not fit {width}em"
    assert fs.fields["mask"].layout.width == "26em"  # "none ([gMASK] appended)" fits
    fs.fields["instruction"].value = "Write Python."
    assert fs.picker.value == "(custom)"  # edited: no longer the shipped template
    fs.fields["instruction"].value = load_template("en-python").instruction
    assert fs.picker.value == "en-python"
    fs.load("en-de-translation")
    assert fs.picker.value == "en-de-translation"
    fs.close()


# ----- TokenInspector -----------------------------------------------------------------------------

def test_token_inspector_compares_two_texts(pipeline):
    inspector = TokenInspector(pipeline, "German:", compare="German: ")
    assert inspector.tokenizer is pipeline.tokenizer
    a, b = inspector.tokens(0), inspector.tokens(1)
    assert [t.id for t in a] == pipeline.tokenizer.encode("German:")
    assert inspector.divergence == len(a) and len(b) == len(a) + 1
    assert f"first divergence at token #{len(a)}" in inspector.divergence_line.value
    assert "outline:2px solid" in inspector.view_b.value
    frame = inspector.to_dataframe()
    assert list(frame.loc["b"]["id"]) == [t.id for t in b]
    inspector.compare.value = False
    assert inspector.divergence is None and inspector.column_b.layout.display == "none"
    assert list(inspector.to_dataframe()["piece"]) == [t.piece for t in a]
    inspector.text_a.value = "x\n\ty  z <script>"
    html = inspector.view_a.value
    assert "↵" in html and "→" in html and "▁▁" in html and "&lt;" in html and "<script" not in html
    assert "characters per token" in inspector.counts_a.value
    inspector.dummy_prefix.value = False
    assert inspector.tokens(0)[0].kind != "dummy_prefix"
