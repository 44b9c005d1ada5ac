""""View code" for the playground: the glmkit Python call and the `glmkit generate` line for one run.

Both are written from one source, the keyword arguments the playground passes to `generate()`, so the
code shown is the run that happened. Settings equal to `GenerationSettings`' defaults are left out.
"""
from __future__ import annotations

import dataclasses
import shlex

from ..generate.sampling import GenerationSettings
from .render import escape_text

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GenerationSettings)}
# Always written out: the CLI's own --max-new-tokens default has differed from GenerationSettings'.
_ALWAYS = ("max_new_tokens",)


def changed_settings(kwargs: dict) -> dict:
    """The generation keyword arguments that differ from `GenerationSettings`' defaults, in field order."""
    settings = GenerationSettings.from_kwargs(**kwargs)  # validates, and normalises stop to a tuple
    values = {name: getattr(settings, name) for name in _DEFAULTS}
    return {name: value for name, value in values.items() if name in _ALWAYS or value != _DEFAULTS[name]}


def backend_source(backend) -> tuple[str, dict]:
    """(config name, load overrides) that rebuild `backend`: its config's name and a changed dtype/device."""
    config = getattr(backend, "config", None)
    name = getattr(config, "name", None) or "glm-tiny"
    overrides = {}
    try:
        from ..config import load_config

        shipped = load_config(name)
    except (OSError, ValueError):  # not a config under configs/: the name is all there is to show
        shipped = None
    for field in ("dtype", "device", "quantization"):
        value = getattr(config, field, None)
        if shipped is not None and value != getattr(shipped, field):
            overrides[field] = value
    return name, overrides


def _is_cluster(backend) -> bool:
    try:
        from ..serve.cluster import GLMCluster
    except ImportError:  # ipyparallel missing: no cluster can exist either
        return False
    return isinstance(backend, GLMCluster)


def python_code(prompt: str, kwargs: dict, backend) -> str:
    """The Python that runs `generate(prompt, **kwargs)` on a fresh copy of `backend`."""
    name, overrides = backend_source(backend)
    arguments = "".join(f", {key}={value!r}" for key, value in overrides.items())
    settings = changed_settings(kwargs)
    call_args = [repr(prompt)] + [f"{key}={list(value) if key == 'stop' else value!r}"
                                  for key, value in settings.items()]
    call = ",\n    ".join(call_args)
    if _is_cluster(backend):
        engines = f", n={backend.n}" if getattr(backend, "n", None) else ""
        device = f", device={overrides['device']!r}" if "device" in overrides else ""
        indented = call.replace("\n", "\n    ")
        return (f"from glmkit.serve.cluster import GLMCluster\n\n"
                f"with GLMCluster(config={name!r}{engines}{device}) as cluster:\n"
                f"    result = cluster.generate(\n        {indented},\n    )\n"
                f"    print(result.text)\n")
    return (f"import glmkit\n\nglm = glmkit.load({name!r}{arguments})\n"
            f"result = glm.generate(\n    {call},\n)\nprint(result.text)\n")


def shell_quote(text: str) -> str:
    """Quote for bash; text with newlines, tabs or other control characters as one-line $'...'."""
    if text.isprintable():
        return shlex.quote(text)
    body = (text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\t", "\\t")
            .replace("\r", "\\r"))
    body = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in body)
    return f"$'{body}'"


def cli_line(prompt: str, kwargs: dict, backend) -> str:
    """The `glmkit generate` command line for the same run.

    Each non-default GenerationSettings field `name` becomes `--name-with-dashes value` (a true boolean a
    bare `--name`, each stop string its own `--stop`): the CLI's flags are generated from GenerationSettings
    the same way, so the two cannot drift. Stop strings use the playground's escapes (`\\n`, `\\s`), which
    the CLI reads as the playground does; the prompt is passed literally.
    """
    name, overrides = backend_source(backend)
    parts = ["glmkit", "generate", shell_quote(prompt)]
    if name != "glm-tiny":
        parts += ["--config", shlex.quote(name)]
    for key, value in overrides.items():
        parts += [f"--{key}", shlex.quote(str(value))]
    for key, value in changed_settings(kwargs).items():
        flag = "--" + key.replace("_", "-")
        if key == "stop":
            for stop in value:
                parts += [flag, shlex.quote(escape_text(stop))]
        elif isinstance(value, bool):
            parts.append(flag)
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


__all__ = ["changed_settings", "python_code", "cli_line", "shell_quote", "backend_source"]
