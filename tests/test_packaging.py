"""pyproject.toml, environment.yml and the setup script install the same things, and nothing banned."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement.strip(), maxsplit=1)[0].lower()


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _conda_pip_requirements() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1
    return pip_sections[0]


def test_environment_yml_matches_pyproject():
    project = _pyproject()["project"]
    wanted = sorted(project["dependencies"] + project["optional-dependencies"]["test"])
    assert sorted(_conda_pip_requirements()) == wanted


def test_required_packages_are_declared_and_apex_deepspeed_are_not():
    project = _pyproject()
    names = {_name(r) for r in project["project"]["dependencies"]}
    no_deps = {_name(r) for r in project["tool"]["glmkit"]["no-deps"]}
    for required in ("torch", "icetk", "ipywidgets", "jupyterlab", "ipyparallel", "pandas"):
        assert required in names
    assert "swissarmytransformer" in no_deps
    everything = names | no_deps | {_name(r) for r in _conda_pip_requirements()}
    assert not everything & {"apex", "deepspeed"}


def test_setup_script_installs_the_no_deps_packages_without_dependencies():
    script = (ROOT / "scripts" / "setup.sh").read_text()
    for requirement in _pyproject()["tool"]["glmkit"]["no-deps"]:
        assert re.search(r"--no-deps\s+\"?" + re.escape(requirement), script), requirement


def test_the_lm_eval_extra_is_tested():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert extras["lm-eval"] and set(extras["lm-eval"]) <= set(extras["test"])  # CI runs the real tool
