"""Run the whole pipeline in a fresh workspace and print timings and the evaluation table.

    python benchmarks/pipeline.py                      # the default (embedded) configuration
    python benchmarks/pipeline.py --profile configs/ci.yaml

Prints: wall time of the first ``dvc repro``, of the second (no-op) ``dvc repro``, per-stage times
from DVC's output order, and the method × task table with normalized accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mergeflow.workspace import make_workspace

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", type=Path, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="workspace dir to use and keep")
    args = ap.parse_args()
    ws = args.keep or Path(tempfile.mkdtemp(prefix="mergeflow-bench-"))
    ws.mkdir(parents=True, exist_ok=True)
    make_workspace(ROOT, ws, args.profile)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    dvc = [sys.executable, "-m", "dvc", "repro"]
    t0 = time.monotonic()
    subprocess.run(dvc, cwd=ws, env=env, check=True)
    first = time.monotonic() - t0
    t0 = time.monotonic()
    out = subprocess.run(dvc, cwd=ws, env=env, check=True, capture_output=True, text=True)
    second = time.monotonic() - t0
    ev = json.loads((ws / "metrics/eval.json").read_text())
    comp = json.loads((ws / "metrics/compress.json").read_text())
    print(f"\nworkspace: {ws}")
    print(
        f"first dvc repro: {first:.0f} s; second dvc repro: {second:.1f} s "
        f"({'no stage ran' if 'Running stage' not in out.stdout else 'STAGES RAN'})"
    )
    print(
        f"TALL archive: {comp['tall']['bytes'] / 1e6:.1f} MB (θ0 by reference; "
        f"{comp['tall']['bytes_with_base'] / 1e6:.1f} MB with θ0) vs experts "
        f"{comp['bytes_experts'] / 1e6:.1f} MB (ratio {comp['tall']['ratio']:.3f}; "
        f"with θ0 {comp['tall']['ratio_with_base']:.3f})\n"
    )
    print((ws / "reports/summary.md").read_text())
    for row in ("task_arithmetic", "ties", "consensus", "tall_masks", "base"):
        if row in ev:
            print(
                f"{row:16s} mean acc {ev[row]['mean_accuracy']:.3f}  "
                f"normalized {ev[row]['mean_normalized']:.3f}"
            )


if __name__ == "__main__":
    main()
