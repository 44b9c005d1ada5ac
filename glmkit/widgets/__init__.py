"""Jupyter widget tools for exploring GLM models: a prompt playground, few-shot templates, a token inspector,
and views inside the model (logit lens, attention, activation patching).

Each tool takes a *backend*: anything with `.tokenizer` (a GLMTokenizer) and
`.generate(prompts, *, on_text=None, should_abort=None, **settings)` — a `GLMPipeline` in this process,
or the multi-GPU cluster. Display a tool by making it the last expression of a cell.
The evaluation tool is `glmkit.widgets.evaluate.EvalWidget` (not imported here: glmkit.evaluation, which it
runs, imports the few-shot templates of this package).
"""
from .attention import AttentionView
from .fewshot import FewShot
from .inspector import TokenInspector
from .lens import LogitLensGrid
from .patching import PatchingHeatmap
from .playground import Playground
from .templates import Example, FewShotTemplate, TemplateError, load_template, shipped_templates
from .tokenomics import TokenomicsCalculator

__all__ = ["Playground", "FewShot", "TokenInspector", "FewShotTemplate", "Example", "TemplateError",
           "load_template", "shipped_templates", "TokenomicsCalculator", "LogitLensGrid", "AttentionView",
           "PatchingHeatmap"]
