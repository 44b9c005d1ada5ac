"""Write the tutorial notebooks in notebooks/ from the cell texts in scripts/notebook_cells/, without outputs.

    python scripts/make_notebooks.py           # (re)writes notebooks/*.ipynb
    python scripts/make_notebooks.py --check   # exit 1 if a committed notebook differs from what this writes

The cells live in scripts/notebook_cells/, one module per notebook, so the notebooks stay clean (no outputs,
no execution counts, stable cell ids) and diff well. Conventions every notebook follows (tests/test_notebooks.py
checks them):
- one config cell near the top, tagged `config`: a GPU user changes only that cell;
- GPU-only cells are tagged `gpu`, start with `# GPU only` and are guarded by `torch.cuda.is_available()`,
  so on a CPU they run and do nothing;
- a notebook that starts a cluster closes it in its last cell, tagged `teardown`; where the notebook leaves a tool
  on screen (02, 03, 09), that cell closes only once the user sets `DONE = True`, so Run All keeps the tool usable.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"

sys.path.insert(0, str(Path(__file__).resolve().parent))

from notebook_cells import (n01_quickstart, n02_prompt_playground, n03_few_shot, n04_blank_infilling,  # noqa: E402
                            n05_tokenizer_quirks, n06_checkpoints, n07_tokenomics, n08_inside_glm, n09_evaluate)

KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


NOTEBOOKS = {
    "01-quickstart.ipynb": n01_quickstart.CELLS,
    "02-prompt-playground.ipynb": n02_prompt_playground.CELLS,
    "03-few-shot.ipynb": n03_few_shot.CELLS,
    "04-blank-infilling.ipynb": n04_blank_infilling.CELLS,
    "05-tokenizer-quirks.ipynb": n05_tokenizer_quirks.CELLS,
    "06-checkpoints.ipynb": n06_checkpoints.CELLS,
    "07-tokenomics.ipynb": n07_tokenomics.CELLS,
    "08-inside-glm.ipynb": n08_inside_glm.CELLS,
    "09-evaluate.ipynb": n09_evaluate.CELLS,
}


def build(cells: list[tuple[str, str, list[str]]]) -> nbformat.NotebookNode:
    """A notebook without outputs; cell ids are stable (c01, c02, …) so regenerating changes nothing."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    for number, (kind, text, tags) in enumerate(cells, start=1):
        source = textwrap.dedent(text).strip("\n")
        metadata = {"tags": tags} if tags else {}
        if kind == "markdown":
            cell = nbformat.v4.new_markdown_cell(source, metadata=metadata)
        else:
            cell = nbformat.v4.new_code_cell(source, metadata=metadata)
        cell.id = f"c{number:02d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render(cells) -> str:
    """The .ipynb text of a notebook, as written to disk."""
    return nbformat.writes(build(cells)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare with the files in notebooks/")
    args = parser.parse_args(argv)
    NOTEBOOK_DIR.mkdir(exist_ok=True)
    stale = []
    for name, cells in NOTEBOOKS.items():
        path = NOTEBOOK_DIR / name
        text = render(cells)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"out of date with scripts/make_notebooks.py: {', '.join(stale)}; "
              f"run python scripts/make_notebooks.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
