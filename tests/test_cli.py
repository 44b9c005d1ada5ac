"""The `glmkit` command line: generate (also from stdin, with newlines), repack, inspect, clean errors."""
from __future__ import annotations

import io
import json
import subprocess
import sys

from glmkit.checkpoint import inspect_checkpoint
from glmkit.cli import main
from glmkit.config import load_config


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


def test_repack_and_inspect(tmp_path, capsys):
    demo = load_config("glm-tiny").checkpoint
    out = tmp_path / "one"
    assert main(["repack", str(demo), str(out), "--shards", "1", "--config", "glm-tiny"]) == 0
    assert inspect_checkpoint(out).num_shards == 1
    assert main(["inspect", str(out)]) == 0
    assert '"num_shards": 1' in capsys.readouterr().out
    assert main(["repack", str(demo), str(tmp_path / "three"), "--shards", "3", "--config", "glm-tiny"]) == 2
    assert "do not divide" in capsys.readouterr().err


def test_console_entry_point_runs_out_of_the_box():
    done = subprocess.run([sys.executable, "-m", "glmkit.cli", "generate", "Some prompt [MASK] here",
                           "--max-new-tokens", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Some prompt ") and done.stdout.rstrip("\n").endswith(" here")
