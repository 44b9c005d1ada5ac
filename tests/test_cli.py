"""The `glmkit` command line: generate (also from stdin, with newlines), repack, inspect, clean errors."""
from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
import typing

from glmkit.checkpoint import inspect_checkpoint
from glmkit.cli import build_parser, main
from glmkit.config import load_config
from glmkit.generate.sampling import GenerationSettings


def test_generate_json(capsys):
    assert main(["generate", "def [MASK](self):", "--json", "--max-new-tokens", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt"] == "def [MASK](self):"
    assert result["text"].startswith("def ") and result["text"].endswith("(self):")
    assert 1 <= result["generated_tokens"] <= 3 and len(result["blanks"]) == 1


def test_multiline_prompt_from_stdin(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("English: cheese\nGerman:"))
    assert main(["generate", "-", "--json", "--max-new-tokens", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt"] == "English: cheese\nGerman:" and result["text"].startswith(result["prompt"])


def test_bad_sampling_parameter_is_a_one_line_error(capsys):
    assert main(["generate", "x", "--do-sample", "--temperature", "-1"]) == 2
    err = capsys.readouterr().err
    assert "temperature must be >= 0" in err and "Traceback" not in err
    assert err.startswith("glmkit: error: ") and err.count("\n") == 1


TWO_MASKS = "def [MASK](self, other):\n    return self.[MASK] + other.value"


def test_stream_writes_each_blank_where_its_mask_was(capsys):
    assert main(["generate", TWO_MASKS, "--json", "--max-new-tokens", "6"]) == 0
    filled = json.loads(capsys.readouterr().out)
    assert len(filled["blanks"]) == 2 and all(filled["blanks"]), filled
    assert main(["generate", TWO_MASKS, "--stream", "--max-new-tokens", "6"]) == 0
    streamed = capsys.readouterr().out
    assert "[MASK]" not in streamed
    assert streamed == filled["text"] + "\n"  # read top to bottom, the stream is the filled text


def test_stop_takes_the_playground_escapes(capsys):
    # The demo model continues `def add(a, b):` on a new line; a stop typed as backslash-n ends it there.
    assert main(["generate", "def add(a, b):", "--json", "--max-new-tokens", "6"]) == 0
    assert "\n" in json.loads(capsys.readouterr().out)["blanks"][0]
    assert main(["generate", "def add(a, b):", "--json", "--max-new-tokens", "6", "--stop", "\\n"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["blanks"] == [""] and result["finish_reason"] == "stop"
    args = build_parser().parse_args(["generate", "x", "--stop", "\\n\\nEnglish:", "--stop", "a\\sb\\t"])
    assert args.stop == ["\n\nEnglish:", "a b\t"]


def _example_value(field, kind):
    """A value for a settings field that differs from its default, and how to write it as a flag."""
    if kind is bool:
        return True, []
    if typing.get_origin(kind) is tuple:
        return ["end"], ["end"]
    value = {int: 3, float: 0.5}[[a for a in typing.get_args(kind) if a is not type(None)][0]
                                 if typing.get_args(kind) else kind]
    assert value != field.default
    return value, [str(value)]


def test_every_generation_setting_is_a_flag():
    hints = typing.get_type_hints(GenerationSettings)
    argv, expected = ["generate", "x"], {}
    for field in dataclasses.fields(GenerationSettings):
        value, words = _example_value(field, hints[field.name])
        argv += ["--" + field.name.replace("_", "-"), *words]
        expected[field.name] = value
    args = vars(build_parser().parse_args(argv))
    assert {name: args.get(name) for name in expected} == expected
    defaults = vars(build_parser().parse_args(["generate", "x"]))
    assert not set(expected) & set(defaults)  # unset flags leave GenerationSettings' own defaults


def test_penalties_beams_and_logprobs_reach_the_model(capsys):
    assert main(["generate", "def add(a, b):", "--json", "--max-new-tokens", "4", "--top-logprobs", "3",
                 "--repetition-penalty", "1.3", "--presence-penalty", "0.5"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["logprobs"][0]
    assert len(rows) == result["generated_tokens"] and all(len(r["top"]) == 3 for r in rows)
    assert all(r["logprob"] <= 0 and r["top"][0][1] >= r["logprob"] for r in rows)
    assert main(["generate", "def add(a, b):", "--max-new-tokens", "3", "--num-beams", "2", "--logprobs"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def add(a, b):") and "blank 1: token, logprob" in out
    assert main(["generate", "x", "--num-beams", "2", "--do-sample"]) == 2
    assert "beam search with sampling" in capsys.readouterr().err


def test_repack_and_inspect(tmp_path, capsys):
    demo = load_config("glm-tiny").checkpoint
    out = tmp_path / "one"
    assert main(["repack", str(demo), str(out), "--shards", "1", "--config", "glm-tiny"]) == 0
    assert inspect_checkpoint(out).num_shards == 1
    assert main(["inspect", str(out)]) == 0
    assert '"num_shards": 1' in capsys.readouterr().out
    assert main(["repack", str(demo), str(tmp_path / "three"), "--shards", "3", "--config", "glm-tiny"]) == 2
    assert "do not divide" in capsys.readouterr().err


def test_repack_reads_the_checkpoints_own_config_and_errors_in_one_line(tmp_path, capsys):
    demo = load_config("glm-tiny").checkpoint
    out = tmp_path / "one"
    assert main(["repack", str(demo), str(out), "--shards", "1"]) == 0  # no --config: model_config.json
    assert inspect_checkpoint(out).num_shards == 1
    capsys.readouterr()
    assert main(["repack", str(demo), str(out), "--shards", "1"]) == 2  # the folder is not empty now
    err = capsys.readouterr().err
    assert err.startswith("glmkit: error: ") and "not an empty folder" in err and err.count("\n") == 1
    assert main(["repack", str(tmp_path / "nothing"), str(tmp_path / "two"), "--shards", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("glmkit: error: ") and "does not exist" in err and "Traceback" not in err


def test_console_entry_point_runs_out_of_the_box():
    done = subprocess.run([sys.executable, "-m", "glmkit.cli", "generate", "Some prompt [MASK] here",
                           "--max-new-tokens", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Some prompt ") and done.stdout.rstrip("\n").endswith(" here")
