"""The tutorial notebooks' cells, one module per notebook (written out by scripts/make_notebooks.py)."""
