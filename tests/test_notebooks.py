"""The tutorial notebooks: committed without outputs, in step with their generator, and each runs top to bottom.

Every notebook is executed with nbclient on the demo model on CPU, in a kernel of this very interpreter, and
fails on the first error output. A notebook must also leave no process behind (its clusters are closed).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import psutil
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "python3"
CELL_TIMEOUT_S = 240  # starting a cluster takes ~15-20 s on 2 cores; no single cell should come near this
GPU_GUARD = "torch.cuda.is_available()"

# What each notebook must visibly have done (text found in its outputs), beyond raising no error.
EXPECTED_OUTPUT = {
    "01-quickstart.ipynb": ["engines in one process group", "finish reason: abort", "streamed pieces"],
    "02-prompt-playground.ipynb": ["finish_reason", "max_new_tokens"],
    "03-few-shot.ipynb": ["Translate English to German.", "Wasser", "stop sequences", "sampled dictionary words: exact",
                          "held-out words: exact"],
    "04-blank-infilling.ipynb": ["[gMASK] appended", "<sop>", "prompt mixes mask kinds", "malformed mask"],
    "05-tokenizer-quirks.ipynb": ["characters per token", "newline", "<0xF0>"],
    "06-checkpoints.ipynb": ["2 -> 1 shard(s)", "1 -> 4 shard(s)", "identical: True"],
    "07-tokenomics.ipynb": ["self-hosted / API cost ratio", "break_even_batch", "dollars_per_1m", "cost_by_batch.csv"],
    "08-inside-glm.ipynb": ["fill: '_value'", "rank of 'value' by layer", "where the answer lives",
                            "nnsight's residual after block 3 equals glmkit's trace: True",
                            "corrupted, block 3 patched: log p"],
    "09-evaluate.ipynb": ["import_module k=0: accuracy", "beats chance", "en-de-bare", "accuracy_median",
                          "from the cache", "lm-eval and glmkit.evaluation: the same choice on 80 of 80"],
}


def write_kernelspec(folder: Path) -> dict[str, str]:
    """A `python3` kernelspec that runs this interpreter, and the environment variables that make it win.

    JUPYTER_PATH comes first in Jupyter's search path, ahead of a user-wide `python3` kernelspec that might
    point at another Python (the one ipykernel ships just says `python`).
    """
    spec_dir = folder / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (glmkit tests)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    return {
        "JUPYTER_PATH": os.pathsep.join([str(folder)] + [p for p in [os.environ.get("JUPYTER_PATH")] if p]),
        # 2 CPU engines on a 2-core machine: one OpenMP thread each, or their spinning threads fight over
        # the cores and generation runs several times slower. Only speed changes, never results.
        "OMP_NUM_THREADS": "1",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",  # silences a debugger warning on every kernel start
    }


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """Kernels started in this test run this interpreter (see write_kernelspec)."""
    env = write_kernelspec(tmp_path / "jupyter")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def descendants() -> set[psutil.Process]:
    return set(psutil.Process().children(recursive=True))


def end_processes(processes: set[psutil.Process], grace_s: float = 15.0) -> list[str]:
    """Wait for processes to exit; kill (by pid) those still alive after `grace_s`; describe those."""
    deadline = time.monotonic() + grace_s
    alive = {p for p in processes if _running(p)}
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = {p for p in alive if _running(p)}
    left = []
    for process in alive:
        try:
            left.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return left


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def output_text(output) -> str:
    if output.output_type == "stream":
        return output.text
    if output.output_type == "error":
        return f"{output.ename}: {output.evalue}"
    data = output.get("data", {})
    return "\n".join(str(data.get(kind, "")) for kind in ("text/plain", "text/html"))


# Notebooks whose tools must still be open and usable after a top-to-bottom run (Run All): a cell run after
# the last one, in the same kernel, prints a line saying so; then it does what the notebook tells the user
# to do when done (DONE = True in the clean-up cell), which must close the tool and stop the engines.
STILL_OPEN = {"02-prompt-playground.ipynb": "playground", "03-few-shot.ipynb": "fewshot", "09-evaluate.ipynb": "tool"}
STILL_OPEN_PROBE = """\
print("after Run All:", "widget open" if {tool}.root.comm is not None else "widget closed",
      len(cluster.status()), "engines")
{teardown}
print("after clean-up:", "widget open" if {tool}.root.comm is not None else "widget closed")"""


def run_notebook(path: Path, probe: str | None = None) -> tuple[nbformat.NotebookNode, float]:
    """Execute a notebook in its folder (then `probe`, a cell of code, in the same kernel); returns it with
    outputs, and the seconds it took."""
    nb = nbformat.read(path, as_version=4)
    if probe is not None:
        nb.cells.append(nbformat.v4.new_code_cell(probe))
    before = descendants()  # e.g. a multiprocessing resource tracker that another test left to pytest
    seen: set[psutil.Process] = set()
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL_NAME, allow_errors=False,
                            resources={"metadata": {"path": str(path.parent)}},
                            on_cell_executed=lambda **_: seen.update(descendants() - before))
    started = time.perf_counter()
    try:
        client.execute()
    finally:
        # The kernel is gone by now; engines and controllers it started must have stopped with it.
        left = end_processes(seen)
    assert not left, f"{path.name} left processes running (killed now): {left}"
    return nb, time.perf_counter() - started


# ----- the committed files ------------------------------------------------------------------------------

def test_there_are_the_nine_tutorials():
    assert [p.name for p in NOTEBOOKS] == sorted(EXPECTED_OUTPUT)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for number, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {number} has outputs: clear them before committing"
            assert cell.execution_count is None, f"{path.name} cell {number} has an execution count"
        assert "execution" not in cell.metadata, f"{path.name} cell {number} has execution timing metadata"
    assert "widgets" not in nb.metadata, f"{path.name} holds saved widget state: clear it before committing"
    assert nb.metadata.kernelspec.name == KERNEL_NAME


def test_notebooks_match_their_generator():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_notebooks.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_config_cell_gpu_cells_guarded_clusters_closed(path):
    nb = nbformat.read(path, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    tags = [cell.metadata.get("tags", []) for cell in code]
    configs = [i for i, t in enumerate(tags) if "config" in t]
    assert len(configs) == 1 and configs[0] == 0, f"{path.name}: the first code cell must be the one config cell"
    assert "CONFIG =" in code[0].source
    for cell, cell_tags in zip(code, tags):
        if "gpu" in cell_tags:
            assert cell.source.startswith("# GPU only"), cell.source[:60]
            assert f"if {GPU_GUARD}" in cell.source, f"{path.name}: a GPU-only cell must be guarded"
        elif "cuda" in cell.source:
            pytest.fail(f"{path.name}: CUDA code outside a cell tagged gpu: {cell.source[:80]!r}")
    source = "\n".join(cell.source for cell in code)
    if re.search(r"^\s*\w+\s*=\s*GLMCluster\(", source, re.MULTILINE):  # not in a `with` block
        assert "teardown" in tags[-1] and ".close()" in code[-1].source, \
            f"{path.name} keeps a cluster in a variable, so its last cell must close it"


# ----- running them ---------------------------------------------------------------------------------------

def test_kernel_runs_this_interpreter(kernel_env):
    spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    assert spec.argv[0] == sys.executable
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import sys, glmkit; print(sys.prefix, glmkit.__file__)")]
    NotebookClient(nb, timeout=60, kernel_name=KERNEL_NAME).execute()
    prefix, package = nb.cells[0].outputs[0].text.split()
    assert prefix == sys.prefix and Path(package).parent == ROOT / "glmkit"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_the_demo_model(path, kernel_env):
    tool, probe = STILL_OPEN.get(path.name), None
    if tool:
        teardown = nbformat.read(path, as_version=4).cells[-1].source
        assert "DONE = False" in teardown, f"{path.name}: Run All must not reach a clean-up that closes the tool"
        probe = STILL_OPEN_PROBE.format(tool=tool, teardown=teardown.replace("DONE = False", "DONE = True"))
    nb, seconds = run_notebook(path, probe)
    text = []
    for number, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            assert output.output_type != "error", f"{path.name} cell {number}: {output_text(output)}"
            text.append(output_text(output))
    joined = "\n".join(text)
    for expected in EXPECTED_OUTPUT[path.name]:
        assert expected in joined, f"{path.name}: no {expected!r} in its outputs"
    if tool:  # Run All must leave the tool on screen and its cluster up; the kernel's shutdown stops them
        assert "after Run All: widget open 2 engines" in joined, f"{path.name} closed its tool during Run All"
        assert "after clean-up: widget closed" in joined, f"{path.name}: its clean-up cell did not close the tool"
    print(f"{path.name}: {seconds:.1f} s")
