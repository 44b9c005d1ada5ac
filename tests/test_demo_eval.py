"""The demo model's evaluation can be redone from a run's console output: printed records parse back."""
from __future__ import annotations

import pytest

from glmkit.lab.demo_eval import format_record, parse_train_log

RECORDS = [
    {"step": 0, "eval_loss": 9.98, "heldout_perplexity": 21589.0412, "ratio_to_unigram": 83.9161,
     "heldout_blank_loss": 10.0131, "elapsed_s": 1.2},
    {"step": 25, "train_loss": 9.87, "lr": 2.5e-4, "tokens_per_s": 349442.5, "elapsed_s": 3.4},
    {"step": 70, "planned_steps": 6429, "elapsed_s": 6.1},
    {"step": 500, "train_loss": 2.95412, "lr": 1.9912e-3, "tokens_per_s": 449156.2, "elapsed_s": 34.4},
    {"step": 6429, "train_loss": 1.3301, "lr": 2e-4, "tokens_per_s": 441667.0, "heldout_perplexity": 4.4912,
     "ratio_to_unigram": 0.01745, "heldout_blank_loss": 1.7661, "elapsed_s": 425.3},
]


def test_printed_records_parse_back_to_their_printed_values():
    lines = [line for r in RECORDS if (line := format_record(r))]
    assert len(lines) == 4  # step 25 is neither an evaluation, the plan nor a 500-step heartbeat
    text = "\n".join(["corpus train  5736 files", "model glm-tiny (overridden): 7,862,144 parameters; "
                      "device cuda NVIDIA H200", *lines, "Traceback (most recent call last):"])
    parsed = parse_train_log(text)
    assert (parsed["device"], parsed["device_name"]) == ("cuda", "NVIDIA H200")
    assert [r["step"] for r in parsed["records"]] == [0, 70, 500, 6429]
    last = parsed["records"][-1]
    assert last == {"step": 6429, "train_loss": 1.33, "lr": 2e-4, "tokens_per_s": 441667.0,
                    "heldout_perplexity": 4.49, "ratio_to_unigram": 0.017, "heldout_blank_loss": 1.766,
                    "elapsed_s": 425.0}
    assert parsed["records"][1] == {"step": 70, "planned_steps": 6429, "elapsed_s": 6.0}
    assert parsed["records"][2]["tokens_per_s"] == 449156.0  # "449,156" with its thousands separator
    assert "eval_loss" not in parsed["records"][0]  # not printed, so not invented


def test_a_log_without_evaluations_or_with_foreign_lines_is_refused():
    with pytest.raises(ValueError, match="no evaluation record.*--train-log"):
        parse_train_log("step    500  train_loss 2.954  elapsed_s 34s\n")
    with pytest.raises(ValueError, match="line 2: unknown key 'loss'"):
        parse_train_log("step 0  heldout_perplexity 9.0\nstep 10  loss 3.0\n")
