"""Pure pieces of the widget tools: HTML rendering, diffing, escapes, and few-shot templates."""
from __future__ import annotations

import pytest

from glmkit.tokenizer import Token
from glmkit.widgets import Example, FewShotTemplate, TemplateError, load_template, shipped_templates
from glmkit.widgets.playground import parse_stop_lines
from glmkit.widgets.render import (Segment, escape_text, first_divergence, generation_html,
                                   probability_colour, token_counts, token_label, tokens_frame,
                                   tokens_html, unescape, visible_whitespace_html)


def tok(id, piece, text, start, end, kind="text"):
    return Token(id, piece, text, start, end, kind)


# ----- escapes and visible whitespace -------------------------------------------------------------

def test_stop_lines_unescape_and_escape_round_trips():
    assert parse_stop_lines("\\n\nEnglish:\\s\n\n\\\\n\n\\t|") == ["\n", "English: ", "\\n", "\t|"]
    assert unescape("a\\qb\\") == "a\\qb\\"  # unknown escapes and a lone backslash stay
    for text in ["\n", " ", "  x  ", "a\\nb", "tab\there\n", "\\s", ""]:
        assert unescape(escape_text(text)) == text
    assert escape_text(" ") == "\\s" and escape_text("\n\n") == "\\n\\n"


def test_visible_whitespace_shows_newlines_tabs_and_trailing_spaces():
    html = visible_whitespace_html("German: \nfoo  bar\t<b>")
    assert "↵" in html and "→" in html and "··" in html
    assert html.count('title="trailing spaces"') == 1  # only the space after "German:"
    assert "&lt;b&gt;" in html and "<b>" not in html


# ----- tokens -------------------------------------------------------------------------------------

def test_tokens_of_every_kind_are_visible(tokenizer):
    tokens = tokenizer.tokens("a\n\tb   c é [MASK]")
    labels = {t.kind: token_label(t) for t in tokens}
    assert token_label(tokens[0]) == "▁a"  # the dummy prefix glued to the first piece
    assert labels["newline"] == "↵" and labels["tab"] == "→"
    assert labels["blank"] == "▁▁▁" and labels["special"] == "[MASK]"
    bytes_ = [t for t in tokens if t.kind == "byte"]
    assert [token_label(t) for t in bytes_] == ["0xC3", "é"]  # the last byte shows the character
    html = tokens_html(tokens)
    assert html.count('class="glmkit-token"') == len(tokens)
    assert f'data-id="{tokens[0].id}"' in html and "piece &#x27;▁&#x27;" in html
    assert "dashed" in html  # byte fallback boxed
    assert 'title="dummy prefix">▁</span>a' in html
    alone = tokenizer.tokens("German:")[0]
    assert alone.kind == "dummy_prefix" and token_label(alone) == "▁"


def test_tokens_html_escapes_pieces():
    html = tokens_html([tok(1, "<script>", "<script>", 0, 8), tok(2, '"', '"', 8, 9)])
    assert "<script>" not in html and "&lt;script&gt;" in html and "&quot;" in html


def test_first_divergence_counts_and_frame():
    a = [tok(1, "a", "a", 0, 1), tok(2, "b", "b", 1, 2)]
    assert first_divergence(a, list(a)) is None
    assert first_divergence(a, a[:1]) == 1
    assert first_divergence(a, [a[0], tok(3, "c", "c", 1, 2)]) == 1
    assert first_divergence([], a) == 0
    assert token_counts(a, "ab") == {"tokens": 2, "characters": 2, "chars_per_token": 1.0}
    assert token_counts([], "")["chars_per_token"] == 0.0
    frame = tokens_frame(a)
    assert list(frame.columns) == ["id", "piece", "text", "start", "end", "kind"] and list(frame["id"]) == [1, 2]
    html = tokens_html(a, diverge_at=1)
    assert html.count("outline:2px solid") == 1


def test_trailing_space_divergence_with_the_real_tokenizer(tokenizer):
    a, b = tokenizer.tokens("German:"), tokenizer.tokens("German: ")
    at = first_divergence(a, b)
    assert at == len(a) and b[at].piece == "▁"
    with_newline = tokenizer.tokens("German:\n")
    assert with_newline[first_divergence(a, with_newline)].kind == "newline"


# ----- generations --------------------------------------------------------------------------------

def test_generation_html_highlights_blanks_and_probabilities():
    blanks = [[Segment(" Paris", -0.1, (("▁Paris", -0.1), ("▁Rome", -3.0)))]]
    html = generation_html(["The capital is", "."], blanks, "[MASK]", probabilities=True)
    assert 'class="glmkit-blank"' in html and "Paris" in html and "&#x27;▁Rome&#x27;" in html
    assert "p = 0.905" in html and probability_colour(-0.1) in html
    plain = generation_html(["The capital is", "."], blanks, "[MASK]")
    assert "hsl(" not in plain and "title=\"p =" not in plain
    live = generation_html(["a ", " b ", " c"], [[Segment("x")]], "[MASK]", streaming=True)
    assert "▌" in live and "[MASK]" in live  # second mask still unfilled
    assert probability_colour(0.0) == "hsl(120, 85%, 80%)" and probability_colour(-50) == "hsl(0, 85%, 80%)"


# ----- few-shot templates -------------------------------------------------------------------------

def test_translation_template_builds_the_exact_prompt():
    t = FewShotTemplate(instruction="Translate English to German.", input_prefix="English:",
                        output_prefix="German:", examples=[("cheese", "Käse"), Example("house", "Haus")])
    assert t.build_prompt("dog") == ("Translate English to German.\nEnglish: cheese\nGerman: Käse\n"
                                     "English: house\nGerman: Haus\nEnglish: dog\nGerman:")
    assert t.stop_sequences() == ["\nEnglish:", "\n"]
    t.trailing_space = True
    assert t.build_prompt("dog").endswith("German: ")
    t.mask = "[MASK]"
    assert t.build_prompt("dog").endswith("German: [MASK]")


def test_python_template_never_stops_at_a_single_newline():
    t = load_template("en-python")
    stops = t.stop_sequences()
    assert "\n" not in stops and "\n\nEnglish:" in stops and "\n\n" in stops
    prompt = t.build_prompt("reverse a list")
    assert prompt.endswith("\n\nEnglish:\nreverse a list\nPython:")
    assert "    return a + b" in prompt
    t.derive_stops, t.stop = False, ["###"]
    assert t.stop_sequences() == ["###"]


def test_separator_inside_outputs_is_not_a_stop():
    t = FewShotTemplate(examples=[("a", "line one\nline two")], example_separator="\n")
    assert t.stop_sequences() == ["\nInput:"]


def test_shipped_templates_load_and_round_trip(tmp_path):
    names = shipped_templates()
    assert {"en-de-translation", "en-python", "zh-en-translation"} <= set(names)
    for name in names:
        t = load_template(name)
        assert t.name == name and t.examples and t.build_prompt("q")
        assert FewShotTemplate.from_yaml(t.to_yaml()) == t
        assert FewShotTemplate.load(t.save(tmp_path / f"{name}.yaml")) == t
    assert "|-" in load_template("en-python").to_yaml()  # code stays readable as a literal block


def test_yaml_round_trip_keeps_awkward_strings():
    t = FewShotTemplate(name="odd", instruction="trailing  \n\ttabbed\n\n", prefix_separator="\t",
                        example_separator="\n\n", examples=[("x \n", "y\r\n  "), ("'q'", '"#: -')],
                        stop=["###", " "], mask="[sMASK]", trailing_space=True)
    assert FewShotTemplate.from_yaml(t.to_yaml()) == t


@pytest.mark.parametrize("data, message", [
    ({"nmae": "x"}, "unknown template fields ['nmae']"),
    ({"examples": {"input": "a"}}, "examples must be a list"),
    ({"examples": [{"input": "a"}]}, "examples[0] must have exactly the keys input and output"),
    ({"examples": [{"input": "a", "output": 3}]}, "examples[0].output must be a string"),
    ({"examples": [{"input": "a [MASK]", "output": "b"}]}, "examples[0].input contains '[MASK]'"),
    ({"mask": "[mask]"}, "mask must be one of"),
    ({"example_separator": ""}, "example_separator must not be empty"),
    ({"trailing_space": "yes"}, "trailing_space must be true or false"),
    ({"input_prefix": 5}, "input_prefix must be a string"),
    ({"stop": ["", "x"]}, "stop[0] must be a non-empty string"),
])
def test_template_validation_names_the_field(data, message):
    with pytest.raises(TemplateError) as error:
        FewShotTemplate.from_dict(data)
    assert message in str(error.value)


def test_bad_yaml_files_and_names_are_reported(tmp_path):
    with pytest.raises(TemplateError, match="not valid YAML"):
        FewShotTemplate.from_yaml("name: [unclosed")
    with pytest.raises(TemplateError, match="must be a mapping"):
        FewShotTemplate.from_yaml("- just\n- a list\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("examples: 3\n")
    with pytest.raises(TemplateError, match=r"bad\.yaml: examples must be a list"):
        FewShotTemplate.load(bad)
    with pytest.raises(FileNotFoundError, match="shipped: \\["):
        load_template("no-such-template")
    with pytest.raises(TemplateError, match="query contains"):
        load_template("en-de-translation").build_prompt("the [gMASK]")
