"""The team dashboard: a self-contained static page of the results (``mergeflow report``).

:func:`write_report` reads a workspace (metrics, plots, learned coefficients, dvc.lock, task data
hashes) and MLflow's run history, and writes ``reports/index.html`` with inline SVG charts
(:mod:`mergeflow.report.svg`). Missing inputs become visible notices, never a crash.
"""

from mergeflow.report.build import Report, build_report, headline_rows, write_report

__all__ = ["Report", "build_report", "headline_rows", "write_report"]
