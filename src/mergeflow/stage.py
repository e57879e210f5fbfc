"""The shared ``main`` of every ``stages/*.py`` entry point: args → paths, params → cfg, run, exit.

Bad input of any kind (params, data, checkpoints, merges) ends with one ``error:`` line naming what
to fix and exit status 2; outputs are written atomically by the stages, so nothing half-written stays.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from pathlib import Path

from mergeflow import tracking
from mergeflow.config import ConfigError, load_params
from mergeflow.runtime import tune_malloc


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input (reported without a traceback)."""
    from mergeflow.compression import ArchiveError
    from mergeflow.data import DataError
    from mergeflow.io import CheckpointError
    from mergeflow.models.hf import ModelError
    from mergeflow.tensors import MergeError

    return (
        ConfigError,
        tracking.TrackingError,
        tracking.TrackingUnavailableError,
        DataError,
        CheckpointError,
        ModelError,
        MergeError,
        ArchiveError,
        FileNotFoundError,
        ValueError,
    )


def main(module: str, argv: list[str] | None = None) -> None:
    """Run stage ``module`` (its ``run(cfg, paths)`` and ``Paths``) in this process.

    Parses ``--params`` and one ``--<field>`` per field of ``Paths`` from ``argv`` (default: the
    command line), loads the params, calls ``run`` and exits 2 with one ``error:`` line on bad
    input (:func:`user_errors`).
    """
    tune_malloc()
    mod = importlib.import_module(module)
    run, paths_cls = mod.run, mod.Paths
    ap = argparse.ArgumentParser(description=module.rsplit(".", 1)[-1])
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    for f in dataclasses.fields(paths_cls):
        ap.add_argument(f"--{f.name.replace('_', '-')}", required=True, dest=f.name)
    args = vars(ap.parse_args(argv))
    try:
        cfg = load_params(args.pop("params"))
        kinds = {f.name: f.type for f in dataclasses.fields(paths_cls)}
        paths = paths_cls(
            **{k: (Path(v) if kinds[k] in (Path, "Path") else v) for k, v in args.items()}
        )
        run(cfg, paths)
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
