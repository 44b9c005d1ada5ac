"""Summaries of per-example results: accuracy per group, template and k with a 95 % Wilson score interval,
and GLM-130B's report over templates (max, median and the example-weighted average of the headline metric).
"""
from __future__ import annotations

import pandas as pd

from .metrics import wilson_interval

# The metric each kind reports first (GLM-130B's: accuracy, and EM for generation).
HEADLINE = {"mul": "accuracy", "gen": "exact_match"}
PROPORTIONS = {"mul": {"accuracy": "correct", "accuracy_token_norm": "correct_token_norm",
                       "accuracy_char_norm": "correct_char_norm"},
               "gen": {"exact_match": "exact_match", "exact": "exact"}}


def _proportion(record: dict, name: str, hits: pd.Series) -> None:
    count, n = int(hits.sum()), int(hits.size)
    low, high = wilson_interval(count, n)
    record[name] = count / n if n else float("nan")
    record[f"{name}_low"], record[f"{name}_high"] = low, high


def summarize(rows: pd.DataFrame, kind: str, by: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per (group, *by, template, k): n, the metrics (and chance for multiple choice), each
    proportion with its 95 % Wilson interval (`_low`, `_high`)."""
    keys = ["group", *by, "template", "k"]
    columns = keys + ["n"] + (["chance"] if kind == "mul" else [])
    for name in PROPORTIONS[kind]:
        columns += [name, f"{name}_low", f"{name}_high"]
    columns += ["f1"] if kind == "gen" else []
    if rows.empty:
        return pd.DataFrame(columns=columns)
    out = []
    for values, part in rows.groupby(keys, sort=False, dropna=False):
        record = dict(zip(keys, values)) | {"n": len(part)}
        if kind == "mul":
            record["chance"] = float((1 / part["choices"].map(len)).mean())
        for name, column in PROPORTIONS[kind].items():
            _proportion(record, name, part[column].astype(bool))
        if kind == "gen":
            record["f1"] = float(part["f1"].mean())
        out.append(record)
    return pd.DataFrame(out, columns=columns)


def over_templates(summary: pd.DataFrame, kind: str, by: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """GLM-130B's report per (group, *by, k): the headline metric's max, median and n-weighted average over
    templates (its prompt files), and how many templates there were."""
    keys = ["group", *by, "k"]
    metric = HEADLINE[kind]
    columns = keys + ["templates", "n", f"{metric}_max", f"{metric}_median", f"{metric}_average", "best_template"]
    if summary.empty:
        return pd.DataFrame(columns=columns)
    out = []
    for values, part in summary.groupby(keys, sort=False, dropna=False):
        scores = part[metric]
        out.append(dict(zip(keys, values)) | {
            "templates": len(part), "n": int(part["n"].sum()), f"{metric}_max": float(scores.max()),
            f"{metric}_median": float(scores.median()),
            f"{metric}_average": float((scores * part["n"]).sum() / part["n"].sum()),
            "best_template": part["template"].iloc[int(scores.to_numpy().argmax())]})
    return pd.DataFrame(out, columns=columns)
