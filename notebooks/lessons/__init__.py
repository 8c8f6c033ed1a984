"""Plumbing the notebooks import, so that each cell shows the idea and not the set-up.

One module per lesson that needs one (``indexes`` for 02, …). The notebooks run with
``notebooks/`` as their working directory (JupyterLab, nbval and ``msstore workbook`` all do),
so ``from lessons import indexes`` finds this package without installing it.
"""
