"""The Playground's error display, View code, presets, history, token table and compare mode.

Behaviour that lives in generation runs against the shipped demo model (the `pipeline` fixture); the presets
file is the widget's own and uses the scripted fake backend of test_widgets.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess

import pytest
import yaml

from glmkit import cli
from glmkit.generate.pipeline import GLMPipeline
from glmkit.widgets import Playground
from glmkit.widgets.compare import token_texts
from glmkit.widgets.render import esc

from test_widgets import FakeBackend, stderr_text

PROMPT = "def [MASK](self, other):\n    return self.value + other.value"


def bash_argv(line: str) -> list[str]:
    """The words bash makes of a command line (quoting, $'...' escapes), without running the command."""
    done = subprocess.run(["bash", "-c", "printf '%s\\0' " + line], capture_output=True, check=True)
    return done.stdout.decode().split("\0")[:-1]


def plain(html: str) -> str:
    """The text a browser shows for an HTML fragment (tags dropped, entities resolved)."""
    import html as html_lib
    return html_lib.unescape(re.sub("<[^>]+>", "", html)).replace("\u200b", "")


@pytest.fixture
def fake(tokenizer):
    return FakeBackend(tokenizer)


@pytest.fixture(scope="module")
def second(demo_config):
    """The demo model again at bf16: a second backend of another precision, as compare mode is for."""
    return GLMPipeline.from_config(demo_config, dtype="bf16")


# ----- defect 4: one clear message, no stale answer -----------------------------------------------

def test_an_error_shows_one_message_and_clears_the_previous_answer(pipeline):
    pg = Playground(pipeline, prompt=PROMPT, max_new_tokens=4)
    pg.generate_button.click()
    assert pg.wait(30) and pg.last_error is None
    answer = pg.result.blanks[0].text
    assert answer and esc(answer) in pg.output.value

    pg.set(strategy="sampling", top_p=0)  # rejected before any compute
    pg.generate_button.click()
    assert "top_p must be in (0, 1]" in pg.status.value
    assert "Traceback" not in stderr_text(pg) and pg.error_details.layout.display == "none"
    assert pg.output.value == "" and pg.result is None  # the last answer is gone, not shown as this one's
    assert pg.token_ids.value == ""

    # An error raised by generation itself, on the background thread, after streaming began.
    pg.set(strategy="greedy", top_p=1.0)
    pg.generate_button.click()
    assert pg.wait(30) and pg.result is not None
    pg.prompt.value = "word " * 600  # longer than the demo model's 512 positions
    pg.generate_button.click()
    assert pg.wait(30)
    assert "512" in pg.status.value and "Traceback" not in pg.status.value
    assert "Traceback" not in stderr_text(pg) and isinstance(pg.last_error, ValueError)
    assert pg.output.value == "" and pg.result is None and not pg.generate_button.disabled


# ----- View code ----------------------------------------------------------------------------------

def test_view_code_runs_the_same_generation_in_python_and_on_the_command_line(pipeline):
    pg = Playground(pipeline, prompt=PROMPT, strategy="sampling", temperature=0.7, top_k=20, seed=5,
                    max_new_tokens=6, show_probabilities=True)
    pg.view_code.value = True
    assert pg.code_box.layout.display is None
    python, command = pg.python_view.value, pg.cli_view.value
    assert (python, command) == pg.code()
    pg.generate_button.click()
    assert pg.wait(30) and pg.last_error is None

    scope: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(python, scope)  # noqa: S102 - the code the user is told to copy
    assert scope["result"].text == pg.result.text and printed.getvalue() == pg.result.text + "\n"
    assert scope["result"].blanks[0].logprobs[0].top == pg.result.blanks[0].logprobs[0].top

    argv = bash_argv(command)
    assert argv[:3] == ["glmkit", "generate", PROMPT]
    no_logprobs = [a for a in argv[1:] if a not in ("--logprobs",)]
    if "--top-logprobs" in no_logprobs:  # the CLI prints no logprobs as text: what it fills is compared
        at = no_logprobs.index("--top-logprobs")
        del no_logprobs[at:at + 2]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert cli.main(no_logprobs) == 0
    assert out.getvalue() == pg.result.text + "\n"

    pg.set(top_p=0)  # half-typed settings show in the code box, not as an error over the answer
    assert "top_p must be in (0, 1]" in pg.python_view.value and pg.result is not None


def test_view_code_writes_stops_and_multiline_prompts_for_the_shell(fake):
    pg = Playground(fake, prompt="a\tb\nc's", stop=["\n", " end "], max_new_tokens=3)
    pg.view_code.value = True
    argv = bash_argv(pg.cli_view.value)
    assert argv[:3] == ["glmkit", "generate", "a\tb\nc's"]
    assert "\n" not in pg.cli_view.value  # one line to paste
    assert argv[argv.index("--stop") + 1] == "\\n" and "\\send\\s" in argv
    assert "stop=['\\n', ' end ']" in pg.python_view.value
    assert "max_new_tokens=3" in pg.python_view.value and "temperature" not in pg.python_view.value


# ----- presets ------------------------------------------------------------------------------------

def test_presets_round_trip_through_a_yaml_file(fake, tmp_path):
    path = tmp_path / "presets" / "mine.yaml"
    pg = Playground(fake, prompt="x", presets_path=path)
    pg.set(strategy="sampling", temperature=0.3, top_p=0.8, seed=11, stop=["\n", "END"], max_new_tokens=9)
    saved = pg.settings()
    pg.save_preset("short sampling")
    assert "saved preset 'short sampling'" in plain(pg.status.value)
    on_disk = yaml.safe_load(path.read_text())["presets"]["short sampling"]
    assert on_disk["stop"] == ["\n", "END"] and on_disk["seed"] == 11 and on_disk["strategy"] == "sampling"

    pg.set(strategy="beam", num_beams=2, stop="", max_new_tokens=20, seed=None)
    pg.load_preset("short sampling")
    assert pg.settings() == saved and pg.generation_kwargs()["stop"] == ["\n", "END"]

    other = Playground(fake, presets_path=path)  # a second tool on the same file sees the preset
    assert "short sampling" in other.presets_bar.name.options
    other.presets_bar.name.value = "short sampling"
    other.presets_bar.load_button.click()
    assert other.settings() == saved

    other.presets_bar.name.value = "nope"
    other.presets_bar.load_button.click()
    assert "no preset 'nope'" in plain(other.status.value) and "short sampling" in plain(other.status.value)
    other.presets_bar.name.value = "bad/name"
    other.presets_bar.save_button.click()
    assert "preset name must be" in plain(other.status.value)
    path.write_text("presets: [unclosed")
    other.presets_bar.load_button.click()
    assert str(path) in plain(other.status.value) and "not valid YAML" in plain(other.status.value)


# ----- history, token table, ids ------------------------------------------------------------------

def test_history_reloads_an_earlier_run(pipeline):
    pg = Playground(pipeline, prompt=PROMPT, max_new_tokens=3)
    pg.generate_button.click()
    assert pg.wait(30)
    first = pg.result
    pg.prompt.value = "Return True if the [MASK] is empty."
    pg.set(strategy="sampling", seed=3, max_new_tokens=5)
    pg.generate_button.click()
    assert pg.wait(30)
    assert len(pg.history) == 2 and len(pg.history_panel.picker.options) == 2

    pg.history_panel.picker.value = 0
    pg.history_panel.load_button.click()
    assert pg.last_error is None
    assert pg.prompt.value == PROMPT and pg.settings()["strategy"] == "greedy"
    assert pg.settings()["max_new_tokens"] == 3 and pg.result is first
    assert plain(pg.output.value) == first.text and "loaded run #1" in pg.status.value
    assert json.loads(pg.token_ids.value) == first.blanks[0].tokens


def test_token_table_lists_each_token_with_its_alternatives(pipeline):
    pg = Playground(pipeline, prompt=PROMPT, max_new_tokens=5, show_probabilities=True)
    pg.generate_button.click()
    assert pg.wait(30) and pg.last_error is None
    blank = pg.result.blanks[0]
    frame = pg.token_table_frame()
    assert list(frame["id"]) == [r.token for r in blank.logprobs] and len(frame) == len(blank.tokens)
    assert all(len(top) == 5 for top in frame["top"])
    html = pg.token_table.value
    assert html.count("<tr>") == len(blank.tokens) + 1  # a header and one row per token
    record = blank.logprobs[0]
    assert f"{record.logprob:.3f}" in html and esc(repr(pipeline.tokenizer.id_to_piece(record.top[1][0]))) in html
    assert json.loads(pg.token_ids.value) == blank.tokens


# ----- compare mode -------------------------------------------------------------------------------

def test_compare_marks_where_two_settings_part(pipeline, tmp_path):
    pg = Playground(pipeline, prompt=PROMPT, max_new_tokens=2, presets_path=tmp_path / "p.yaml")
    pg.set(max_new_tokens=6)
    pg.save_preset("longer")
    pg.set(max_new_tokens=2)
    pg.compare.value = True
    assert pg.compare_row.layout.display is None and "longer" in pg.compare_settings.options
    pg.compare_backend.value = "a"
    pg.compare_settings.value = "longer"
    pg.generate_button.click()
    assert pg.wait(60) and pg.last_error is None
    a, b = pg.result.blanks[0].tokens, pg.compared.blanks[0].tokens
    # Greedy both: B goes on where A stopped at 2 tokens (the demo model's fill ' _value' is 3), so they
    # part at token #2, where A has ended.
    assert len(a) == 2 and b[:2] == a and len(b) > 2
    assert "first divergence at generated token #2: A (ended)" in plain(pg.divergence_line.value)
    assert pg.output_b.value.count('data-diverges="true"') == 1 and 'data-diverges' not in pg.output.value
    assert plain(pg.output.value).endswith(pg.result.text) and plain(pg.output_b.value).endswith(pg.compared.text)
    assert pg.token_ids.value == f"A: {json.dumps(a)}\nB: {json.dumps(b)}"

    pg.compare_settings.value = "same settings as A"  # greedy twice on one model: identical
    pg.generate_button.click()
    assert pg.wait(60)
    assert "identical: the same 2 generated tokens" in pg.divergence_line.value


def test_compare_two_backends_side_by_side(pipeline, second):
    pg = Playground(pipeline, prompt="Return True if the [MASK] is empty, False otherwise.",
                    second_backend=second, max_new_tokens=8)
    pg.compare.value = True
    assert pg.compare_backend.value == "b" and "bf16" in pg.compare_backend.label
    pg.generate_button.click()
    assert pg.wait(60) and pg.last_error is None
    own = second.generate(pg.prompt.value, max_new_tokens=8)
    assert pg.compared.text == own.text and pg.compared.blanks[0].tokens == own.blanks[0].tokens
    a, b = pg.result.blanks[0].tokens, pg.compared.blanks[0].tokens
    line = plain(pg.divergence_line.value)
    if a == b:
        assert line == f"identical: the same {len(a)} generated tokens"
    else:
        at = next(i for i, (x, y) in enumerate(zip(a + [None], b + [None])) if x != y)
        assert line.startswith(f"first divergence at generated token #{at}:")
        for view, ids in ((pg.output, a), (pg.output_b, b)):
            marked = re.findall(r'data-diverges="true" title="#(\d+) id', view.value)
            assert marked == ([str(at)] if at < len(ids) else [])
    assert "bf16" in plain(pg.output_b.value) and pg.history.iloc[-1].output == pg.result.text
    pg.load_run(0)
    assert pg.compare.value and pg.compared is not None


def test_token_texts_join_to_each_blank(pipeline):
    result = pipeline.generate(["A [MASK] B", "x = 'é[gMASK]"], max_new_tokens=6, stop=["\n"])
    for r in result:
        for blank in r.blanks:
            pieces = token_texts(pipeline.tokenizer, blank)
            assert len(pieces) == len(blank.tokens) and "".join(pieces) == blank.text
