"""Run the paper-regime profile end to end and commit-ready results (issue 17).

    nohup python benchmarks/paper.py --out results/paper > paper.log 2>&1 &     # ~2 h, 2 cores

Makes a fresh workspace with ``configs/paper.yaml`` merged into ``params.yaml`` (or reuses
``--keep DIR``), runs ``dvc repro`` there, and writes ``--out`` with :func:`mergeflow.results.write`
(eval.json with intervals, summary.md, experts' stopping steps, per-stage wall times from the
``dvc repro`` output, each "Running stage" line to the next, imports included), params,
lineage) plus ``claims.md``: every method's paper headline
(``benchmarks/paper_claims.yaml``) beside our measured mean normalized accuracy, its 95 %
interval, and its difference to task arithmetic with the paired interval.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from mergeflow import results
from mergeflow.workspace import make_workspace

ROOT = Path(__file__).resolve().parents[1]


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def claims_markdown(ev: dict, claims: dict, learned: dict) -> str:
    """The "paper claims vs ours" table: one row per method present in ``ev`` or ``claims``.

    Args:
        ev: ``eval.json`` of the run.
        claims: ``benchmarks/paper_claims.yaml``.
        learned: ``coefficients.learned`` of the run's params (budget per learned row).

    Returns:
        A markdown table.
    """
    out = (
        "| method | paper (setting) | paper: normalized (method ÷ experts) | paper: TA normalized | "
        "paper's claim | ours: mean normalized [95 % CI] | ours − TA [95 % paired CI] | "
        "budget / note |\n|---|---|---:|---:|---|---:|---:|---|\n"
    )
    for name, c in claims.items():
        ind = c.get("individual_abs")
        p_norm = c["method_abs"] / ind * 100 if ind and c.get("method_abs") else None
        p_ta = c["ta_abs"] / ind * 100 if ind and c.get("ta_abs") else None
        if name in ev:
            r = ev[name]
            lo, hi = r.get("mean_normalized_ci", [float("nan")] * 2)
            ours = f"{r['mean_normalized']:.3f} [{lo:.3f}, {hi:.3f}]"
            p = r.get("paired", {}).get("task_arithmetic")
            if name == "task_arithmetic":
                vs = "–"
            elif p:
                noise = " (within noise)" if p["within_noise"] else ""
                vs = f"{p['diff']:+.3f} [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}]{noise}"
            else:
                vs = "–"
        else:
            ours, vs = "not run", "–"
        note = ""
        if name in learned:
            b = learned[name]
            note = ", ".join(f"{k} {b[k]}" for k in ("steps", "lr", "batch_size", "k") if k in b)
        verified = "" if c.get("verified") else " (unverified)"
        out += (
            f"| {name} | {c['paper']} ({c['setting']}) | {_pct(p_norm)} | {_pct(p_ta)} | "
            f"{c['claim']}{verified} | {ours} | {vs} | {note} |\n"
        )
    return out


def timed_repro(ws: Path, env: dict[str, str]) -> dict[str, float]:
    """``dvc repro`` in ``ws`` (output echoed); wall seconds per stage item that ran.

    Raises:
        subprocess.CalledProcessError: ``dvc repro`` failed.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"], cwd=ws, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    times: dict[str, float] = {}
    current, since = None, time.monotonic()
    for line in proc.stdout:
        print(line, end="", flush=True)
        m = re.match(r"Running stage '([^']+)'", line)
        if m:
            now = time.monotonic()
            if current:
                times[current] = round(now - since, 1)
            current, since = m[1], now
    if current:
        times[current] = round(time.monotonic() - since, 1)
    if proc.wait():
        raise subprocess.CalledProcessError(proc.returncode, "dvc repro")
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--profile", type=Path, default=ROOT / "configs/paper.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "results/paper")
    ap.add_argument("--keep", type=Path, default=None, help="workspace dir to use and keep")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    args = ap.parse_args()
    if args.out.exists() and not args.force:
        sys.exit(f"error: {args.out} exists; pass --force to replace it")
    ws = args.keep or Path(tempfile.mkdtemp(prefix="mergeflow-paper-"))
    if not (ws / "dvc.yaml").is_file():
        ws.mkdir(parents=True, exist_ok=True)
        make_workspace(ROOT, ws, args.profile)
    print(f"workspace: {ws}", flush=True)
    # the stages run the workspace's copy of the code: the one its dvc.yaml deps hash
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        PYTHONPATH=str(ws / "src"),
    )
    t0 = time.monotonic()
    timings = timed_repro(ws, env)
    print(f"dvc repro: {time.monotonic() - t0:.0f} s", flush=True)
    out = results.write(ws, args.out, timings, force=args.force)
    ev = json.loads((out / "eval.json").read_text())
    claims = yaml.safe_load((ROOT / "benchmarks/paper_claims.yaml").read_text())
    learned = yaml.safe_load((ws / "params.yaml").read_text())["coefficients"].get("learned", {})
    (out / "claims.md").write_text(claims_markdown(ev, claims, learned or {}))
    print((out / "summary.md").read_text())
    print((out / "claims.md").read_text())


if __name__ == "__main__":
    main()
