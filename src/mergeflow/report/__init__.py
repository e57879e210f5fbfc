"""The team dashboard: a self-contained static page of the results (``mergeflow report``).

:func:`write_report` reads a workspace (metrics, plots, learned coefficients, dvc.lock, task data
hashes) and MLflow's run history, and writes ``reports/index.html``: charts drawn by matplotlib
(:mod:`mergeflow.report.charts`) inlined as SVG into one Jinja2 template
(``templates/index.html.j2``). Missing inputs become visible notices, never a crash.
"""

from mergeflow.report.build import Report, build_report, headline_rows, write_report

__all__ = ["Report", "build_report", "headline_rows", "write_report"]
