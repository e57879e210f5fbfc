"""The dashboard of the ci-size run, opened in headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",  # CI runs as root
    "--headless",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="/usr/bin/chromium is missing: `apt-get install -y chromium` (.ci/run does this)",
    ),
]


def open_page(pw, url: str, shot: Path) -> dict:
    """Load ``url`` in a fresh headless Chromium profile; report what the browser saw.

    Every request other than the page itself is recorded and blocked (the page must need no
    network), console errors and uncaught page errors are collected, and every chart is measured.
    """
    with tempfile.TemporaryDirectory() as profile:
        ctx = pw.chromium.launch_persistent_context(
            profile,  # a fresh --user-data-dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=FLAGS,
            viewport={"width": 1400, "height": 900},
        )
        try:
            requests: list[str] = []

            def route(r):
                if r.request.url == url:
                    r.continue_()
                else:
                    requests.append(r.request.url)
                    r.abort()

            ctx.route("**/*", route)
            page = ctx.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            resp = page.goto(url, wait_until="load")
            charts = page.eval_on_selector_all(
                "svg.chart",
                """els => els.map(e => {
                    const r = e.getBoundingClientRect();
                    return {id: e.closest('figure') ? e.closest('figure').id : '',
                            w: r.width, h: r.height, marks: e.querySelectorAll(
                              'rect.bar, circle, path, rect.cell').length};
                })""",
            )
            info = {
                "ok": resp is None or resp.ok,
                "errors": errors,
                "requests": requests,
                "charts": charts,
                "title": page.title(),
                "rows": page.locator("#accuracy-table tbody tr").count(),
                "norm_rows": page.locator("#normalized-table tbody tr").count(),
                "notices": [n.inner_text() for n in page.locator(".notice").all()],
                "notice_boxes": [n.bounding_box() for n in page.locator(".notice").all()],
                "sections": page.locator("main section").count(),
                "first_run": page.locator("#history p.first-run").count() == 1,
            }
            page.screenshot(path=str(shot), full_page=True)
        finally:
            ctx.close()
    return info


def test_dashboard_of_the_ci_run_renders_in_chromium(ci_workspace: Path, tmp_path: Path):
    from playwright.sync_api import sync_playwright

    out = tmp_path / "site" / "index.html"
    # the workspace's own MLflow store (./mlflow.db), as a user running `mergeflow report` there
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MERGEFLOW_TRACKING")}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "mergeflow"), "report", "--root", str(ci_workspace),
         "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    evals = json.loads((ci_workspace / "metrics" / "eval.json").read_text())
    shot = tmp_path / "dashboard.png"
    with sync_playwright() as pw:
        info = open_page(pw, out.resolve().as_uri(), shot)
        assert info["ok"] and info["title"] == "mergeflow dashboard"
        assert info["errors"] == [], info["errors"]
        assert info["requests"] == [], f"the page fetched {info['requests']}"
        assert info["rows"] == len(evals) and info["norm_rows"] == len(evals)
        ids = {c["id"] for c in info["charts"]}
        tasks = next(iter(evals.values()))["accuracy"]
        expected = {"fig-mean-normalized", "fig-pareto", "fig-scaling"}
        assert expected | {f"fig-task-{t}" for t in tasks} <= ids, ids
        # history: a chart of the runs MLflow recorded, or "First run" when it recorded none
        assert ("fig-history" in ids) != info["first_run"], (ids, info["first_run"])
        for c in info["charts"]:
            assert c["w"] > 100 and c["h"] > 100 and c["marks"] > 0, c
        assert info["sections"] == 7
        assert shot.stat().st_size > 50_000

        # the same browser check on a broken workspace: notices are visible, nothing crashes
        broken = tmp_path / "broken"
        (broken / "metrics").mkdir(parents=True)
        (broken / "metrics" / "eval.json").write_text("{truncated")
        from mergeflow.report import write_report

        write_report(broken, broken / "index.html")
        bad = open_page(pw, (broken / "index.html").as_uri(), tmp_path / "broken.png")
        assert bad["errors"] == [] and bad["requests"] == [] and bad["rows"] == 0
        assert any("metrics/eval.json" in n and "unreadable" in n for n in bad["notices"])
        assert all(b and b["width"] > 100 and b["height"] > 10 for b in bad["notice_boxes"])
        assert len(bad["notices"]) >= 6
